"""Multi-step integer arithmetic with step-wise privileged hints.

A question is an expression such as ``12+47*8-96``. The reference solution executes it one operation at a
time, multiplication first, then left to right, and ends with ``#<answer>``::

    47*8=376;12+376=388;388-96=292;#292

The privileged hint p is the *decomposition without execution*: which operation comes next and on what, with
``_`` standing for the previous result, never the values::

    47*8;12+_;_-96

Two kinds of response token exist by construction:

* capability tokens: the digits of each intermediate result (``376``, ``388``...). Producing them needs
  multi-digit arithmetic with carries, which a bigger, longer-trained teacher does and a small student does
  not, whether or not p is in context;
* plan tokens: which operands open each step. They follow from operator precedence, a skill the hint hands over
  for free (a model that reads p can copy them).

Splits: ``train``, ``test`` (same distribution, disjoint seed stream) and ``ood`` (one more operation).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from dopd.tasks.base import Example

HINT_FORMS = ("stepwise", "stepwise_exec", "answer", "summary", "none")
_ANSWER = re.compile(r"#(-?\d+)")


@dataclass
class ArithTask:
    """Expressions of `n_ops` operations over operands of up to `max_digits` digits (`*` takes a 1-digit factor).

    `max_operand`, when set, additionally caps every operand drawn by digit count (not the 2-9 factor of `*`)
    at that value: a difficulty knob between `max_digits=1` and `max_digits=2`. None (default) keeps the cap
    at `10**max_digits - 1`, the original distribution.
    """

    name: str = "arith"
    n_ops: int = 2
    ood_extra_ops: int = 1
    max_digits: int = 2
    max_operand: int | None = None
    hint_form: str = "stepwise"
    splits: tuple[str, ...] = ("train", "test", "ood")
    hint_forms: ClassVar[tuple[str, ...]] = HINT_FORMS

    def __post_init__(self):
        if self.hint_form not in HINT_FORMS:
            raise ValueError(f"task.hint_form={self.hint_form!r} is not one of {HINT_FORMS}; set task.hint_form=...")
        if self.n_ops < 1 or self.max_digits < 1:
            raise ValueError(f"task.n_ops and task.max_digits must be >= 1, got {self.n_ops} and {self.max_digits}")
        if self.max_operand is not None and self.max_operand < 1:
            raise ValueError(f"task.max_operand must be >= 1 or None, got {self.max_operand}")

    # -- generation -------------------------------------------------------------------------------------------
    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; valid: {self.splits}")
        # Disjoint, reproducible streams per split; held-out questions never equal a training question.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        n_ops = self.n_ops + (self.ood_extra_ops if split == "ood" else 0)
        seen_train = set() if split == "train" else {e.question for e in self._stream("train", seed, 2000)}
        out: list[Example] = []
        while len(out) < n:
            ex = self._one(rng, n_ops)
            if ex is not None and ex.question not in seen_train:
                out.append(ex)
        return out

    def _stream(self, split, seed, n):
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out = []
        while len(out) < n:
            ex = self._one(rng, self.n_ops)
            if ex is not None:
                out.append(ex)
        return out

    def _operand(self, rng: random.Random) -> int:
        hi = 10 ** rng.randint(1, self.max_digits) - 1
        return rng.randint(1, hi if self.max_operand is None else min(hi, self.max_operand))

    def _one(self, rng: random.Random, n_ops: int) -> Example | None:
        ops = [rng.choice("+-*") for _ in range(n_ops)]
        nums = [self._operand(rng)]
        for op in ops:
            nums.append(rng.randint(2, 9) if op == "*" else self._operand(rng))
        question = "".join(f"{a}{op}" for a, op in zip(nums, ops)) + str(nums[-1])
        steps = execute_steps(nums, ops)
        if steps is None:
            return None
        answer = str(steps[-1][1])
        solution = ";".join(f"{expr}={val}" for expr, val, _ in steps) + f";#{answer}"
        return Example(question, self._hint(steps, answer), answer, solution, domain=self.name)

    def _hint(self, steps, answer: str) -> str:
        if self.hint_form == "stepwise":
            return ";".join(plan for _, _, plan in steps)
        if self.hint_form == "stepwise_exec":
            return ";".join(f"{expr}={val}" for expr, val, _ in steps)
        if self.hint_form == "answer":
            return f"#{answer}"
        if self.hint_form == "summary":
            return f"{len(steps)} steps, * first"
        return ""

    # -- verification -----------------------------------------------------------------------------------------
    def extract_answer(self, response: str) -> str | None:
        m = _ANSWER.search(response)
        return m.group(1) if m else None

    def is_correct(self, response: str, example: Example) -> bool:
        return self.extract_answer(response) == example.answer


def execute_steps(nums: list[int], ops: list[str]) -> list[tuple[str, int, str]] | None:
    """Multiplications first (left to right), then + and - left to right; None if a value goes negative (public:
    task=reason writes its worked steps with it).

    Each step is (expression, value, plan) where the plan writes an earlier result as `_`.
    """
    items: list = [(nums[0], False)]
    for op, b in zip(ops, nums[1:]):
        items += [op, (b, False)]
    steps: list[tuple[str, int, str]] = []
    for wanted in ("*", "+-"):
        i = 1
        while i < len(items):
            if items[i] in wanted:
                (a, a_res), op, (b, b_res) = items[i - 1], items[i], items[i + 1]
                val = a * b if op == "*" else a + b if op == "+" else a - b
                if val < 0:
                    return None
                plan = f"{'_' if a_res else a}{op}{'_' if b_res else b}"
                steps.append((f"{a}{op}{b}", val, plan))
                items[i - 1 : i + 2] = [(val, True)]
            else:
                i += 2
    return steps
