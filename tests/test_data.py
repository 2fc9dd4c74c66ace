"""Prompt batches: determined by (seed, step), sliced per rank, disjoint from evaluation questions."""

from __future__ import annotations

import pytest


def test_batch_size_must_split_across_ranks():
    from types import SimpleNamespace

    from dopd.data import PromptDataModule
    from dopd.tasks.arith import ArithTask

    dm = PromptDataModule(ArithTask(), batch_size=3)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, global_step=0)
    dm.setup()
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        dm.train_dataloader()


def test_each_rank_gets_a_disjoint_slice_of_the_global_batch():
    from dopd.data import StepBatches
    from dopd.tasks.arith import ArithTask

    exs = ArithTask().examples("train", 40, 0)
    ranks = [list(StepBatches(exs, 8, seed=1, shard=lambda r=r: (r, 2))) for r in (0, 1)]
    full = list(StepBatches(exs, 8, seed=1))
    for step, (a, b) in enumerate(zip(*ranks)):
        assert len(a) == len(b) == 4
        assert sorted(e.question for e in a + b) == sorted(e.question for e in full[step])


def test_training_prompts_never_include_an_evaluation_question():
    from dopd.data import PromptDataModule
    from dopd.tasks.arith import ArithTask

    dm = PromptDataModule(ArithTask(max_digits=1), n_train=3000, n_eval=200)  # a small space: collisions are certain
    dm.setup()
    held_out = {e.question for exs in dm.eval_examples.values() for e in exs}
    assert held_out and not held_out & {e.question for e in dm.train_examples}
    assert len(dm.train_examples) < 3000
