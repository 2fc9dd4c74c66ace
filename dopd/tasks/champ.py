"""CHAMP (Mao et al., 2024): 270 competition math problems with human-written hints, the hints as p.

The data ships inside the PyPI package `champ-dataset` (champ_dataset/dataset_files/v0.json, no download);
it is imported lazily, so the rest of the harness works without it (`pip install -e '.[champ]'`).

* x: the problem text; p: its hints, in the order the dataset lists them, numbered one per line. A hint is a
  step of the plan ("Let x_n be ...", "Express P(2k) in terms of P(2k-2)") rather than the answer, like the
  paper's privileged input (not checked per hint). `concepts=true` also adds the general facts CHAMP attaches (e.g. the
  definition of C(n, k)).
* answers: CHAMP writes them for humans ("@@C(10, 5)@@, or equivalently @@252@@", "0 is the only possible
  value", "Yes"). `gold_answers` turns them into math-verify-checkable forms; the problems whose answer is
  free text (e.g. "The sequence does not exist") or a condition ("x(n)<y(n-1) for all n>=3") would need an LLM
  judge and are left out (35), as are problems without hints (25: no p to distil). 210 remain.
* splits: deterministic and stratified by category. Within each category problems are ordered by
  sha1("<split_seed>/<problem id>") and the first round(test_fraction * n) go to `test`, the rest to `train`.
  The split depends only on (split_seed, test_fraction) and the problem ids, never on the run seed; the
  defaults (0, 0.3) give 147 train / 63 test problems.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field

from dopd import answers
from dopd.tasks.base import Example, seeded_subset

log = logging.getLogger(__name__)

_ALTERNATIVES = re.compile(r",\s*or (?:equivalently|an equivalent form such as|approximately)\s+")
_SEGMENT = re.compile(r"@@(.+?)@@")
_LEADING_NUMBER = re.compile(r"^(-?\d+)(?:\s|$)")
_NUMBER_LIST = re.compile(r"^-?\d+(?:(?:, | and |, and )-?\d+)+$")
_FREE_TEXT = ("...", "for all", "±sqrt")  # ellipses, conditions and symbolic ± lists: no reliable automatic check


def _load():
    try:
        import champ_dataset
    except ImportError as err:
        raise ImportError("task=champ needs the CHAMP data package: pip install -e '.[champ]' "
                          "(or pip install champ-dataset)") from err
    return champ_dataset.load("v0")


def _call(name: str, text: str, fmt) -> str:
    """Rewrite name(args) calls (balanced parentheses) with fmt(list of args split at top-level commas)."""
    out, i = [], 0
    while True:
        m = re.search(rf"(?<![A-Za-z]){name}\(", text[i:])
        if m is None:
            return "".join(out) + text[i:]
        start = i + m.start()
        j, depth, args, cur = i + m.end(), 1, [], []
        while j < len(text) and depth:
            ch = text[j]
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 1 and ch == ",":
                args.append("".join(cur).strip())
                cur = []
            elif depth:
                cur.append(ch)
            j += 1
        if depth:  # unbalanced: leave the rest as it is
            return "".join(out) + text[i:]
        args.append("".join(cur).strip())
        out.append(text[i:start] + fmt(args))
        i = j


def to_latex(expr: str) -> str:
    """CHAMP's plain-text math -> LaTeX that math-verify reads: C(n, k), floor(x), sqrt(x), unicode signs."""
    expr = expr.replace("−", "-").replace("≥", "\\ge ").replace("≤", "\\le ").replace("±", "\\pm ")
    expr = _call("C", expr, lambda a: f"\\binom{{{a[0]}}}{{{a[1]}}}" if len(a) == 2 else f"C({', '.join(a)})")
    expr = _call("floor", expr, lambda a: f"{{\\lfloor {a[0]} \\rfloor}}")  # braced: it may be an exponent
    return _call("sqrt", expr, lambda a: f"\\sqrt{{{a[0]}}}")


def gold_answers(raw: str) -> tuple[str, ...]:
    """The accepted forms of one CHAMP answer (any may match); () when it cannot be checked automatically."""
    golds: list[str] = []
    for alt in _ALTERNATIVES.split(raw.strip()):
        alt = alt.strip()
        if any(t in alt for t in _FREE_TEXT) or alt.endswith("%"):
            continue
        segments = _SEGMENT.findall(alt)
        if segments:
            rest = _SEGMENT.sub("", alt)
            if len(segments) > 1 and not re.fullmatch(r"(\s*(and|or)\s*)*", rest):
                continue  # several pieces with words between them ("for all", "if ... for odd n"): a condition
            if "sum_" in alt:
                continue
            if len(segments) > 1:  # several solutions, each maybe a tuple: "(x=1, y=1), (x=3, y=2)"
                segments = [f"({s})" if "," in s and not s.startswith("(") else s for s in segments]
            golds.append(", ".join(to_latex(s) for s in segments))
        elif alt in ("Yes", "No") or alt.startswith("Yes,"):
            golds.append(alt[:3].rstrip(",").lower())
        elif _NUMBER_LIST.match(alt):
            golds.append(re.sub(r",? and ", ", ", alt))
        elif _LEADING_NUMBER.match(alt):
            golds.append(_LEADING_NUMBER.match(alt).group(1))
        elif m := re.search(r"(?:is equal to|only possible value for the limit is) (-?\d+)$", alt):
            golds.append(m.group(1))
    return tuple(dict.fromkeys(golds))


@dataclass
class ChampTask:
    """CHAMP as train/test splits; `test_fraction` of each category is held out (see the module docstring)."""

    name: str = "champ"
    test_fraction: float = 0.3
    split_seed: int = 0
    concepts: bool = False
    splits: tuple[str, ...] = field(init=False, default=("train", "test"))

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"task.test_fraction must lie in (0, 1), got {self.test_fraction}")
        dataset = _load()
        by_category: dict[str, list[tuple[str, Example, tuple[str, ...]]]] = {}
        dropped = {"no hints": 0, "free-text answer": 0}
        for pid, prob in dataset.problems.items():
            hints = [dataset[c].text for c in prob.ch_list if c.startswith("H_") or (self.concepts and c.startswith("C_"))]
            golds = gold_answers(prob.raw_answer)
            if not hints:
                dropped["no hints"] += 1
                continue
            if not golds:
                dropped["free-text answer"] += 1
                continue
            steps = " ".join(s.text for s in prob.solution.steps)
            ex = Example(question=prob.text, hint="\n".join(f"{i}. {h}" for i, h in enumerate(hints, 1)),
                         answer=golds[0], solution=f"{steps} The final answer is $\\boxed{{{golds[0]}}}$.",
                         domain=prob.category)
            by_category.setdefault(prob.category, []).append((pid, ex, golds))
        self.golds: dict[str, tuple[str, ...]] = {}
        self.rows: dict[str, list[Example]] = {"train": [], "test": []}
        for category in sorted(by_category):
            items = sorted(by_category[category],
                           key=lambda it: hashlib.sha1(f"{self.split_seed}/{it[0]}".encode()).hexdigest())
            n_test = round(self.test_fraction * len(items))
            for k, (_, ex, golds) in enumerate(items):
                self.rows["test" if k < n_test else "train"].append(ex)
                self.golds[ex.question] = golds
        log.info("CHAMP: %d train / %d test problems (left out: %s)", len(self.rows["train"]), len(self.rows["test"]),
                 dropped)

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        return seeded_subset(self.name, self.rows, split, n, seed)

    def extract_answer(self, response: str) -> str | None:
        return answers.extract_boxed_or_last(response)

    def is_correct(self, response: str, example: Example) -> bool:
        return answers.is_correct(response, self.golds.get(example.question, (example.answer,)))
