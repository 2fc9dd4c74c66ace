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
    # 2 prompts x 2 rollouts per process, in loss micro-batches of 2 rows: DOPD's bars over both processes' tokens
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", *FAST, "data.batch_size=4", "optim.micro_batch_size=2",
           "router=dopd",
           f"logger.tracking_uri={uri}", f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=CONF.rsplit("/", 1)[0], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world_size: 2" in res.stdout + res.stderr or "MEMBER: 2/2" in res.stdout + res.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])  # rank 1 logs nothing
    assert run.info.status == "FINISHED"
    assert {"train/loss", "eval/acc/avg", "train/regime/HT/frac"} <= set(run.data.metrics)
