"""Prompt data: a LightningDataModule over a task's examples (the model samples its own responses)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from dopd.tasks.base import Example


def _as_list(batch: list[Example]) -> list[Example]:
    return list(batch)


class PromptDataModule(L.LightningDataModule):
    """Training prompts (shuffled with a seeded generator) and evaluation prompts per held-out split."""

    def __init__(self, task, batch_size: int = 8, n_train: int = 4096, n_eval: int = 256, seed: int = 0,
                 data_seed: int = 0):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.n_train, self.n_eval, self.data_seed = n_train, n_eval, data_seed
        self.train_examples: list[Example] = []
        self.eval_examples: dict[str, list[Example]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        self.train_examples = self.task.examples(self.task.splits[0], self.n_train, self.data_seed)
        if not self.train_examples:
            raise ValueError(f"task {self.task.name!r} produced no training examples; check its data source")
        self.eval_examples = {s: self.task.examples(s, self.n_eval, self.data_seed) for s in self.task.splits[1:]}

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_examples, batch_size=self.batch_size, shuffle=True, generator=gen,
                          collate_fn=_as_list, drop_last=len(self.train_examples) >= self.batch_size)
