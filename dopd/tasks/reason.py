"""Three kinds of multi-step reasoning with one shared capability: the privilege-illusion testbed.

Every question in every domain is solved by the same kind of response, a chain of executed operations::

    5+17=22;22*3=66;66-8=58;#58

What differs between domains is the *decomposition*, i.e. which operation comes next and on what:

* ``arith``: an expression with precedence, ``12+47*8-96`` (multiplications first, then left to right);
* ``vars``: definitions in a shuffled order, ``c=b+17,a=12,b=a*3;c?`` (follow the dependency chain);
* ``funcs``: one-operation functions composed inside out, ``f=*3,g=+17,h=-8;h(f(g(5)))``.

The privileged hint p (``stepwise``, the default) is the decomposition *without execution*: the chain of steps
with every earlier result written ``_`` (``5+17;_*3;_-8``). So two kinds of response token exist by
construction, as in the paper's §2.1:

* plan tokens (which operands open each step) are predictable from p: both models copy them once they see it;
* capability tokens (the digits after each ``=``) need multi-digit arithmetic, which the bigger teacher does
  better *whether or not* it sees p. These are where a privileged teacher should beat a privileged student (HT).

Hint forms (Table 4): ``stepwise`` (plan, no values), ``stepwise_exec`` (plan with values: the whole solution),
``answer`` (``#58``), ``summary`` (step count and operators, ``3 steps:+*-``), ``none`` (empty: the control
variant, where p carries no information), and ``mixed`` (one of the five per question, for the SFT stage that
teaches both models to read every form).

Splits: ``train``, ``test`` (same distribution, disjoint from train) and ``ood`` (harder: larger operands with
``ood_max_operand``/``ood_max_value``, and/or ``ood_extra_steps`` more steps; the config uses larger operands,
since both models fail longer chains almost always). The
``domains`` a task draws its questions from and the ``eval_domains`` it is evaluated on can differ, so
cross-domain OOD (train on one, test on others, Fig. 7b) and continual learning (Fig. 7a) are configs.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import ClassVar

from dopd.tasks.arith import execute_steps
from dopd.tasks.base import Example, check_domains_and_form

DOMAINS = ("arith", "vars", "funcs")
HINT_FORMS = ("stepwise", "stepwise_exec", "answer", "summary", "none", "mixed")
_ANSWER = re.compile(r"#(-?\d+)")

Step = tuple[str, int, str]  # (executed expression "22*3", value 66, plan "_*3")


@dataclass
class ReasonTask:
    """Questions from `domains` (round-robin), `n_steps` operations each (`ood`: harder, see the module doc).

    Operands are 1..`max_operand`, `*` takes a factor 2..9, and no value may leave 0..`max_value`.
    """

    name: str = "reason"
    domains: tuple[str, ...] = DOMAINS
    eval_domains: tuple[str, ...] | None = None  # None: the training domains
    n_steps: int = 2
    ood_extra_steps: int = 1
    max_operand: int = 20
    max_value: int = 400
    distractors: int = 2  # unused definitions in vars/funcs questions: without p, the chain must be traced
    ood_max_operand: int | None = None  # ood: larger operands than training (None: the same)
    ood_max_value: int | None = None
    hint_form: str = "stepwise"
    splits: tuple[str, ...] = ("train", "test", "ood")
    hint_forms: ClassVar[tuple[str, ...]] = HINT_FORMS[:5]  # the forms p can take for evaluation
    _banned: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        check_domains_and_form(self, DOMAINS, HINT_FORMS)
        if self.n_steps < 1 or self.max_operand < 1:
            raise ValueError(f"task.n_steps and task.max_operand must be >= 1, got {self.n_steps}, {self.max_operand}")

    # -- generation -------------------------------------------------------------------------------------------
    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` questions of `split`, spread evenly over the split's domains; never a training question."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; valid: {self.splits}")
        domains = self.domains if split == self.splits[0] else self.eval_domains
        steps = self.n_steps + (self.ood_extra_steps if split == "ood" else 0)
        banned = set() if split == self.splits[0] else self._train_questions(seed)
        streams = {d: random.Random(f"{self.name}/{d}/{split}/{seed}") for d in domains}
        limits = (self.ood_max_operand, self.ood_max_value) if split == "ood" else (None, None)
        out: list[Example] = []
        while len(out) < n:
            domain = domains[len(out) % len(domains)]
            ex = self._one(domain, streams[domain], steps, *limits)
            if ex is not None and ex.question not in banned:
                out.append(ex)
        return out

    def _train_questions(self, seed: int, n: int = 3000) -> set[str]:
        if seed not in self._banned:
            rngs = {d: random.Random(f"{self.name}/{d}/{self.splits[0]}/{seed}") for d in DOMAINS}
            self._banned[seed] = {ex.question for d in DOMAINS for ex in
                                  (self._one(d, rngs[d], self.n_steps) for _ in range(n)) if ex is not None}
        return self._banned[seed]

    def _one(self, domain: str, rng: random.Random, n_steps: int, max_operand: int | None = None,
             max_value: int | None = None) -> Example | None:
        question, steps = _GENERATORS[domain](self, rng, n_steps, max_operand or self.max_operand)
        if steps is None or any(not 0 <= v <= (max_value or self.max_value) for _, v, _ in steps):
            return None
        answer = str(steps[-1][1])
        solution = ";".join(f"{expr}={val}" for expr, val, _ in steps) + f";#{answer}"
        # "mixed" draws the form from the question itself, so the question stream is the same for every form
        form = random.Random(question).choice(HINT_FORMS[:5]) if self.hint_form == "mixed" else self.hint_form
        return Example(question, render_hint(form, steps, answer), answer, solution, domain=domain)

    @staticmethod
    def _op(rng: random.Random, cap: int) -> tuple[str, int]:
        op = rng.choice("+-*")
        return op, rng.randint(2, 9) if op == "*" else rng.randint(1, cap)

    def _arith(self, rng, n_steps, cap):
        ops = [rng.choice("+-*") for _ in range(n_steps)]
        nums = [rng.randint(1, cap)] + [rng.randint(2, 9) if op == "*" else rng.randint(1, cap) for op in ops]
        question = "".join(f"{a}{op}" for a, op in zip(nums, ops)) + str(nums[-1])
        return question, execute_steps(nums, ops)

    def _chain(self, rng, n_steps, cap) -> tuple[int, list[tuple[str, int]], list[Step] | None]:
        """A start value and n_steps (op, operand) applied in order, executed; operands up to `cap`."""
        start, ops = rng.randint(1, cap), [self._op(rng, cap) for _ in range(n_steps)]
        steps, value = [], start
        for i, (op, b) in enumerate(ops):
            new = value + b if op == "+" else value - b if op == "-" else value * b
            steps.append((f"{value}{op}{b}", new, f"{value if i == 0 else '_'}{op}{b}"))
            value = new
        return start, ops, steps

    def _vars(self, rng, n_steps, cap):
        start, ops, steps = self._chain(rng, n_steps, cap)
        names = rng.sample(string.ascii_lowercase, n_steps + 1 + self.distractors)
        defs = [f"{names[0]}={start}"] + [f"{names[i + 1]}={names[i]}{op}{b}" for i, (op, b) in enumerate(ops)]
        for j in range(self.distractors):  # a dead end: refers to a chain variable but feeds nothing asked
            op, b = self._op(rng, cap)
            defs.append(f"{names[n_steps + 1 + j]}={rng.choice(names[: n_steps + 1 + j])}{op}{b}")
        names = names[: n_steps + 1]
        rng.shuffle(defs)
        return ",".join(defs) + f";{names[-1]}?", steps

    def _funcs(self, rng, n_steps, cap):
        start, ops, steps = self._chain(rng, n_steps, cap)
        names = rng.sample("fghkmnpqrs", n_steps + self.distractors)  # names[i] applies ops[i]
        defs = [f"{name}={op}{b}" for name, (op, b) in zip(names, ops + [self._op(rng, cap) for _ in range(self.distractors)])]
        names = names[:n_steps]
        rng.shuffle(defs)
        call = str(start)
        for name in names:
            call = f"{name}({call})"
        return ",".join(defs) + f";{call}", steps

    # -- verification -----------------------------------------------------------------------------------------
    def extract_answer(self, response: str) -> str | None:
        m = _ANSWER.search(response)
        return m.group(1) if m else None

    def is_correct(self, response: str, example: Example) -> bool:
        return self.extract_answer(response) == example.answer

    @staticmethod
    def token_kinds(pieces: list[str]) -> list[str]:
        """The kind of each response token (its text), for `scripts/regime_anatomy.py`: ``plan`` (an operator or
        operand: given by p), ``result`` (a digit after ``=``: the capability), ``copy`` (a digit that opens a
        step: the previous result again), ``answer`` (after ``#``) and ``format`` (``=``, ``;``, ``#``, the rest)."""
        kinds, state = [], "plan"
        for piece in pieces:
            ch = piece[:1]
            if ch in ("=", ";", "#"):
                kinds.append("format")
                state = {"=": "result", ";": "copy", "#": "answer"}[ch]
            elif ch.isdigit():
                kinds.append(state)
            elif ch in ("+", "-", "*"):
                kinds.append("plan")
                state = "plan"
            else:
                kinds.append("format")
        return kinds


_GENERATORS = {"arith": ReasonTask._arith, "vars": ReasonTask._vars, "funcs": ReasonTask._funcs}


def render_hint(form: str, steps: list[Step], answer: str) -> str:
    """p in one of Table 4's forms, from the executed steps."""
    if form == "stepwise":
        return ";".join(plan for _, _, plan in steps)
    if form == "stepwise_exec":
        return ";".join(f"{expr}={val}" for expr, val, _ in steps)
    if form == "answer":
        return f"#{answer}"
    if form == "summary":
        return f"{len(steps)} steps:" + "".join(next(c for c in plan[1:] if c in "+-*") for _, _, plan in steps)
    return ""
