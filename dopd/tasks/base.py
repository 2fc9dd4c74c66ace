"""What a task is: examples with a prompt x, a privileged text p, a reference solution and a checkable answer."""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    question: str  # x: all the deployed student ever sees
    hint: str  # p: privileged text, training-time only ("" when the form is "none")
    answer: str  # the verifiable final answer
    solution: str  # a reference response, used only by the SFT stage that builds the model zoo
    domain: str = "default"
    image: Any = field(default=None, compare=False, repr=False)  # x's image (PIL image or file path), vision tasks

    @property
    def key(self) -> str:
        """What makes two prompts the same x: the question, and for vision tasks the image's pixels."""
        if self.image is None:
            return self.question
        if isinstance(self.image, str):
            return f"{self.question}\x00{self.image}"
        return f"{self.question}\x00{hashlib.sha1(self.image.tobytes()).hexdigest()}"

    def to_dict(self) -> dict:
        out = asdict(self)
        if not isinstance(self.image, str):
            out.pop("image")
        return out


class Task(Protocol):
    """A source of examples per split and a verifier of responses."""

    name: str
    splits: tuple[str, ...]  # the first is the training split, the rest are evaluated

    def examples(self, split: str, n: int, seed: int) -> list[Example]: ...

    def extract_answer(self, response: str) -> str | None: ...

    def is_correct(self, response: str, example: Example) -> bool: ...


def check_domains_and_form(task, domains: tuple[str, ...], hint_forms: tuple[str, ...]) -> None:
    """Shared by the synthetic tasks: `domains` and `eval_domains` (None: the training domains) are non-empty
    subsets of `domains`, and `hint_form` is one of `hint_forms`. Normalises both to tuples (Hydra passes lists)."""
    task.domains = tuple(task.domains)
    task.eval_domains = tuple(task.eval_domains) if task.eval_domains else task.domains
    for key in ("domains", "eval_domains"):
        bad = [d for d in getattr(task, key) if d not in domains]
        if bad or not getattr(task, key):
            raise ValueError(f"task.{key}={list(getattr(task, key))} must be a non-empty subset of {list(domains)}")
    if task.hint_form not in hint_forms:
        raise ValueError(f"task.hint_form={task.hint_form!r} is not one of {hint_forms}; set task.hint_form=...")


def seeded_subset(task_name: str, rows: dict[str, list[Example]], split: str, n: int, seed: int) -> list[Example]:
    """A seeded random subset of a fixed dataset's split: all rows (shuffled) when n exceeds it, never duplicates."""
    if split not in rows:
        raise ValueError(f"unknown split {split!r} for task {task_name!r}; valid: {tuple(rows)}")
    out = list(rows[split])
    random.Random(f"{task_name}/{split}/{seed}").shuffle(out)
    if n > len(out):
        log.warning("task %s: %d %s examples asked for, the split has %d; using all of them", task_name, n, split,
                    len(out))
    return out[: max(0, n)]
