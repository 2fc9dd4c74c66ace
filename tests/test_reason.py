"""The reasoning testbed: questions mean what their solutions say, hints are the forms Table 4 names, splits hold."""

from __future__ import annotations

import re

import pytest

from dopd.tasks.reason import DOMAINS, HINT_FORMS, ReasonTask


def _apply(value: int, op: str, b: int) -> int:
    return value + b if op == "+" else value - b if op == "-" else value * b


def solve(domain: str, question: str) -> int:
    """An independent solver of the question text (no access to the generator's steps)."""
    if domain == "arith":
        return eval(question)  # the expressions use Python's precedence for + - *
    defs, asked = question.split(";")
    if domain == "vars":
        table = dict(d.split("=") for d in defs.split(","))

        def value(name):
            m = re.fullmatch(r"([a-z])([-+*])(\d+)", table[name])
            return int(table[name]) if m is None else _apply(value(m.group(1)), m.group(2), int(m.group(3)))

        return value(asked.rstrip("?"))
    funcs = {d[0]: (d[2], int(d[3:])) for d in defs.split(",")}
    names = re.findall(r"([a-z])\(", asked)
    value = int(re.search(r"\((\d+)\)+$", asked).group(1))
    for name in reversed(names):
        value = _apply(value, *funcs[name])
    return value


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_solutions_answer_the_question(split):
    task = ReasonTask()
    for ex in task.examples(split, 300, 0):
        assert int(ex.answer) == solve(ex.domain, ex.question), ex
        assert ex.solution.endswith(f"#{ex.answer}")
        for step in ex.solution.split(";")[:-1]:  # each executed step is right
            expr, val = step.split("=")
            assert eval(expr) == int(val), step
        assert ex.solution.count(";") == task.n_steps + (task.ood_extra_steps if split == "ood" else 0)


def test_domains_round_robin_and_distractors():
    exs = ReasonTask(distractors=2).examples("test", 30, 0)
    assert [ex.domain for ex in exs[:3]] == list(DOMAINS)
    for ex in exs:
        if ex.domain != "arith":  # chain of n_steps (+1 start value for vars) plus two dead ends
            assert ex.question.split(";")[0].count(",") + 1 == 2 + (3 if ex.domain == "vars" else 2)


def test_heldout_never_in_train_and_streams_are_seeded():
    task = ReasonTask()
    train = {ex.question for ex in task.examples("train", 3000, 0)}
    for split in ("test", "ood"):
        held = task.examples(split, 500, 0)
        assert not train & {ex.question for ex in held}
        assert held == ReasonTask().examples(split, 500, 0)
    assert task.examples("test", 50, 0) != task.examples("test", 50, 1)


def test_hint_forms():
    by_form = {form: ReasonTask(hint_form=form).examples("test", 60, 0) for form in HINT_FORMS}
    questions = [ex.question for ex in by_form["stepwise"]]
    for form, exs in by_form.items():  # the question stream does not depend on the form
        assert [ex.question for ex in exs] == questions, form
    for plain, execd, ans, summ, none in zip(*(by_form[f] for f in HINT_FORMS[:5])):
        steps = plain.solution.split(";")[:-1]
        assert execd.hint == ";".join(steps)  # with execution: the whole solution but the answer marker
        assert plain.hint.count(";") == len(steps) - 1 and "=" not in plain.hint  # without execution: no values
        for plan, step in zip(plain.hint.split(";")[1:], steps[1:]):
            assert plan.startswith("_") or plan.endswith("_")  # earlier results are hidden
        assert ans.hint == f"#{plain.answer}" and none.hint == ""
        assert summ.hint.startswith(f"{len(steps)} steps:") and len(summ.hint.split(":")[1]) == len(steps)
    assert len({ex.hint[:1] for ex in by_form["mixed"]}) > 2  # several forms in one mixed set


def test_cross_domain_evaluation():
    task = ReasonTask(domains=("vars",), eval_domains=("arith", "funcs"))
    assert {ex.domain for ex in task.examples("train", 20, 0)} == {"vars"}
    assert {ex.domain for ex in task.examples("test", 20, 0)} == {"arith", "funcs"}


@pytest.mark.parametrize("bad", [dict(domains=("algebra",)), dict(eval_domains=("geometry",)), dict(hint_form="oracle"),
                                 dict(n_steps=0)])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        ReasonTask(**bad)


def test_ood_by_larger_operands():
    task = ReasonTask(ood_extra_steps=0, ood_max_operand=30, ood_max_value=600)
    ood = task.examples("ood", 300, 0)
    operands = [int(x) for ex in ood for x in re.findall(r"\d+", ex.question.split(";")[0])]
    assert max(operands) > 20 and max(int(ex.answer) for ex in ood) <= 600
    assert all(ex.solution.count(";") == task.n_steps for ex in ood)
    assert all(int(ex.answer) == solve(ex.domain, ex.question) for ex in ood)
    test = task.examples("test", 300, 0)
    assert max(int(x) for ex in test if ex.domain == "funcs" for x in re.findall(r"\((\d+)\)", ex.question)) <= 20
