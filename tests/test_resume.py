"""Crash safety: a training process killed with SIGKILL resumes into the same MLflow run and ends where an
uninterrupted run ends (same data position, RNG, optimiser and scheduler state)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import CONF, FAST

ROOT = Path(CONF).parent
JOB = [o for o in FAST if not o.startswith(("trainer.max_steps", "eval.every"))] + [
    "router=dopd", "trainer.max_steps=8", "eval.every=4", "checkpoint_every=2", "seed=3"]


def _cmd(out: Path, *extra):
    return [sys.executable, "train.py", *JOB, f"paths.output_dir={out}", f"logger.tracking_uri=sqlite:///{out}/mlflow.db",
            f"hydra.run.dir={out}/runs/${{now:%H-%M-%S-%f}}", *extra]


def _final(out: Path):
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    (ckpt,) = out.glob("runs/*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=False)
    last = {}
    for k in ("train/loss", "train/entropy", "eval/acc/avg"):
        history = client.get_metric_history(runs[0].info.run_id, k)
        final_step = max(m.step for m in history)
        last[k] = [m.value for m in history if m.step == final_step][-1]  # a resumed run re-logs redone steps
    return runs, state, last


@pytest.mark.slow
def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "crash"
    subprocess.run(_cmd(ref_out), cwd=ROOT, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (ckpt,) = out.glob("runs/*/checkpoints/last.ckpt")
    killed_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert killed_at < 8, "the run finished before it could be killed"

    res = subprocess.run(_cmd(out, "resume=true"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    ref_runs, ref_state, ref_last = _final(ref_out)
    runs, state, last = _final(out)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    assert state["global_step"] == ref_state["global_step"] == 8
    for k, v in ref_state["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][k], v, msg=k)
    assert last == pytest.approx(ref_last, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_a_kill_during_the_final_evaluation_loses_no_evaluation(tmp_path):
    """max_steps a multiple of checkpoint_every (the default job: 200/50): the step's evaluation runs inside the
    step, before its checkpoint, so a kill during it leaves the previous checkpoint and the resume redoes both."""
    slow_eval = ["data.n_eval=256", "eval.pass_k=4", "checkpoint_every=4"]
    ref_out, out = tmp_path / "ref", tmp_path / "crash"
    subprocess.run(_cmd(ref_out, *slow_eval), cwd=ROOT, check=True, capture_output=True, timeout=600)
    err_log = tmp_path / "crash.err"
    with open(err_log, "w") as err_file:
        proc = subprocess.Popen(_cmd(out, *slow_eval), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=True)
    deadline = time.time() + 300

    def logged(key: str, step: int) -> bool:
        if not list(out.glob("runs/*/checkpoints/last.ckpt")):  # the store is set up by then: a client opened
            return False  # earlier would race the job's own creation of its tables
        try:
            client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
            exp = client.get_experiment_by_name("dopd")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return bool(runs) and any(m.step == step for m in client.get_metric_history(runs[0].info.run_id, key))
        except Exception:  # the store is being created or written
            return False

    while not logged("train/loss", 7) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # the last step's metrics are out: its evaluation (slow here) is running now
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before its kill: {err_log.read_text()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not logged("eval/acc/avg", 8), "the final evaluation finished before the kill"
    res = subprocess.run(_cmd(out, *slow_eval, "resume=true"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (ref_run,), _, ref_last = _final(ref_out)
    (run,), _, last = _final(out)
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    assert 8 in {m.step for m in client.get_metric_history(run.info.run_id, "eval/acc/avg")}
    assert run.info.status == "FINISHED" and last == pytest.approx(ref_last, rel=1e-6, abs=1e-7)
