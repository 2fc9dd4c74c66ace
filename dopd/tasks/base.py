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
