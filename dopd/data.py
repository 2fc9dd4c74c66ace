"""Prompt data: a LightningDataModule over a task's examples (the model samples its own responses)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from dopd.tasks.base import Example

log = logging.getLogger(__name__)


class StepBatches:
    """Shuffled batches of prompts where the batch of global step s is a function of (seed, s) alone.

    After a resume, iteration starts at the restored `trainer.global_step`, so the resumed run sees exactly the
    batches the uninterrupted run would have. (`state_dict`/`load_state_dict` tell Lightning the position is
    handled: it is derived from the step, so there is nothing to store.)
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, start_step=lambda: 0,
                 shard=lambda: (0, 1)):
        self.dataset, self.batch_size, self.seed, self.start_step = examples, batch_size, seed, start_step
        self.shard = shard  # (rank, world size): under DDP each rank takes its slice of every global batch

    def __len__(self) -> int:
        return max(1, len(self.dataset) // self.batch_size)

    def batch(self, step: int) -> list[Example]:
        epoch, index = divmod(step, len(self))
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        rows = perm[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        return [self.dataset[i % len(self.dataset)] for i in rows] if rows else [self.dataset[0]]

    def __iter__(self):
        start = self.start_step()
        first = start - start % len(self)  # the epoch's first step
        rank, world = self.shard()
        for step in range(start, first + len(self)):
            yield self.batch(step)[rank::world]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
        self.eval_examples = {s: self.task.examples(s, self.n_eval, self.data_seed) for s in self.task.splits[1:]}
        held_out = {ex.key for exs in self.eval_examples.values() for ex in exs}
        # Never train on an evaluation question: held-out accuracy must measure generalisation.
        drawn = self.task.examples(self.task.splits[0], self.n_train, self.data_seed)
        self.train_examples = [ex for ex in drawn if ex.key not in held_out]
        if len(self.train_examples) < len(drawn):
            log.info("dropped %d training prompts that are also evaluation prompts", len(drawn) - len(self.train_examples))
        if not self.train_examples:
            raise ValueError(f"task {self.task.name!r} produced no training examples; check its data source")

    def train_dataloader(self) -> StepBatches:
        trainer = self.trainer
        if trainer is not None and self.batch_size % trainer.world_size:
            raise ValueError(f"data.batch_size={self.batch_size} must be divisible by the number of processes "
                             f"({trainer.world_size}): each rank takes an equal slice of every batch")
        return StepBatches(self.train_examples, self.batch_size, self.seed,
                           start_step=lambda: trainer.global_step if trainer is not None else 0,
                           shard=lambda: (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1))
