"""Answer extraction and math-verify equivalence (dopd/answers.py), and the CHAMP task built on them."""

from __future__ import annotations

import threading

import pytest

from dopd.answers import extract_boxed_or_last, is_correct, last_boxed, math_equal


def test_extraction():
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{x^{2}+\\{1\\}}") == "x^{2}+\\{1\\}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("no box") is None
    assert extract_boxed_or_last("we get 12, then 1,000 apples") == "1000"
    assert extract_boxed_or_last("3/4 of -7") == "-7" and extract_boxed_or_last("nothing") is None


@pytest.mark.parametrize("pred,gold", [("\\frac{3}{4}", "3/4"), ("0.75", "3/4"), ("\\binom{10}{5}", "252"),
                                       ("x = 2, y = 1", "x=2, y=1"), ("19, 1", "1, 19"), ("\\text{No}", "no"),
                                       ("Yes, it is", "yes"), ("2^{n-1}", "2^(n-1)"), ("[-1,1]", "[-1, 1]"),
                                       ("\\frac{1}{\\sqrt{3}}", "\\sqrt{3}/3")])
def test_equivalent_forms(pred, gold):
    assert math_equal(pred, gold)


@pytest.mark.parametrize("pred,gold", [("4/3", "3/4"), ("251", "252"), ("no", "yes"), ("1", "1, 19"), (None, "1"),
                                       ("", "1"), ("1" * 600, "1" * 600)])
def test_different_or_unusable_answers(pred, gold):
    assert not math_equal(pred, gold)


def test_works_outside_the_main_thread():
    """math-verify's default timeout uses SIGALRM, which raises outside the main thread: answers would all be wrong."""
    out = []
    t = threading.Thread(target=lambda: out.append(is_correct("so \\boxed{\\frac{1}{2}}", ["0.5"])))
    t.start()
    t.join()
    assert out == [True]


# -- CHAMP ---------------------------------------------------------------------------------------------------------
champ = pytest.importorskip("champ_dataset", reason="pip install -e '.[champ]'")


def test_champ_gold_answers():
    from dopd.tasks.champ import gold_answers

    assert gold_answers("@@C(10, 5)@@, or equivalently @@252@@") == ("\\binom{10}{5}", "252")
    assert gold_answers("0 is the only possible value") == ("0",)
    assert gold_answers("The limit exists and is equal to @@2/3@@") == ("2/3",)
    assert gold_answers("1, 4 and 9") == ("1, 4, 9",)
    assert gold_answers("@@x=0, y=2@@ and @@x=9, y=11@@") == ("(x=0, y=2), (x=9, y=11)",)
    assert gold_answers("No") == ("no",)
    for free_text in ("The sequence does not exist", "@@x(n)<y(n-1)@@ for all @@n≥3@@", "@@x(x-1)...(x-2022)@@"):
        assert gold_answers(free_text) == ()
    assert math_equal("2^{\\lfloor n/2\\rfloor}\\lfloor n/2\\rfloor!", gold_answers("@@2^floor(n/2)*floor(n/2)!@@")[0])


def test_champ_task_split_hints_and_checking(tmp_path):
    from dopd.pipeline import build_task
    from tests.conftest import compose_cfg

    task = build_task(compose_cfg(["task=champ"], tmp_path).task)
    train, test = task.examples("train", 1000, 0), task.examples("test", 1000, 0)
    assert task.splits == ("train", "test") and len(train) + len(test) == 210 and len(test) == 63
    assert not {e.question for e in train} & {e.question for e in test}
    assert {e.domain for e in test} == {"Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence"}
    again = type(task)()  # the split is a function of (split_seed, test_fraction) only
    assert [e.question for e in again.rows["test"]] == [e.question for e in task.rows["test"]]
    assert [e.question for e in type(task)(split_seed=1).rows["test"]] != [e.question for e in task.rows["test"]]
    for ex in train + test:
        assert ex.hint.startswith("1. ") and ex.hint.strip()
        assert task.is_correct(ex.solution, ex), ex  # the reference solution boxes an accepted form
    ex = next(e for e in train + test if e.question.endswith("have strictly increasing digits?"))
    assert task.is_correct("There are $\\boxed{252}$ of them.", ex) and task.is_correct("\\boxed{\\binom{10}{5}}", ex)
    assert not task.is_correct("\\boxed{251}", ex)
    view = compose_cfg(["task=champ"], tmp_path).task.view
    assert "\\boxed{}" in view.plain.format(question="q", hint="h") and "h" in view.privileged.format(question="q", hint="h")


def test_champ_missing_package_says_how_to_install(monkeypatch):
    import builtins

    from dopd.tasks import champ as champ_task

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "champ_dataset" else real_import(name, *a, **k))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[champ\]'"):
        champ_task.ChampTask()
