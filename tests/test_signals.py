"""Pre-emption (SIGTERM) and Ctrl-C (SIGINT) sent to a real `python train.py` mid-training: the job's MLflow run ends
KILLED and the process exits 128+signal; in a sweep, the sweep stops with that status, its parent run is not left
RUNNING and failed_jobs.txt names the killed job. (Lightning turns SIGTERM into a SystemExit without code, which
used to end the job, and the whole sweep, with status 0.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import CONF, FAST

ROOT = Path(CONF).parent
# Long enough never to finish by itself; a checkpoint after every step tells the test that training is under way.
JOB = [o for o in FAST if not o.startswith(("trainer.max_steps", "eval.every"))] + [
    "trainer.max_steps=100000", "eval.every=100000", "eval.at_start=false", "checkpoint_every=1", "router=vanilla"]


def _interrupt_after_first_checkpoint(out: Path, sig: signal.Signals, *args: str) -> tuple[int, str]:
    """Start train.py in its own process group, wait for its first last.ckpt, signal the group; (status, log)."""
    log = out / "train.log"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", *args, *JOB, f"paths.output_dir={out}",
           f"logger.tracking_uri=sqlite:///{out}/mlflow.db"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(out.glob("**/checkpoints/last.ckpt")):
            assert proc.poll() is None, f"train.py ended (status {proc.returncode}) before its first checkpoint:\n" \
                                        + log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint after 300 s:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=120), log.read_text()
        except subprocess.TimeoutExpired:
            pytest.fail(f"train.py still running 120 s after {sig.name}:\n" + log.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _runs(out: Path):
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("dopd").experiment_id])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_run_ends_killed_with_a_nonzero_status(tmp_path, sig):
    status, log = _interrupt_after_first_checkpoint(tmp_path, sig)
    assert status == 128 + sig, f"exit status {status}, expected {128 + sig}:\n{log[-3000:]}"
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED", (run.info.status, run.data.tags.get("error"))
    assert sig.name in run.data.tags["error"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_sweep_stops_with_a_nonzero_status_and_names_the_killed_job(tmp_path, sig):
    status, log = _interrupt_after_first_checkpoint(tmp_path, sig, "-m", "seed=1,2")
    assert status == 128 + sig, f"exit status {status}, expected {128 + sig}:\n{log[-3000:]}"
    runs = _runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status in ("KILLED", "FAILED") and parent.data.tags.get("failed_jobs") == "1"
    assert [(c.info.run_name, c.info.status) for c in children] == [("vanilla-seed1", "KILLED")]  # job 1 never ran
    (failures,) = tmp_path.glob("multiruns/*/failed_jobs.txt")
    lines = failures.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("job 0 (") and sig.name in lines[0], lines
