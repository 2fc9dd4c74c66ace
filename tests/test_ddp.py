"""Lightning's own DDP strategy on 2 CPU processes (gloo): trains, evaluates across ranks, logs one MLflow run."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from tests.conftest import CONF, FAST


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", *FAST, "data.batch_size=4", "router=dopd",
           f"logger.tracking_uri={uri}", f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=CONF.rsplit("/", 1)[0], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world_size: 2" in res.stdout + res.stderr or "MEMBER: 2/2" in res.stdout + res.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])  # rank 1 logs nothing
    assert run.info.status == "FINISHED"
    assert {"train/loss", "eval/acc/avg", "train/regime/HT/frac"} <= set(run.data.metrics)


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
