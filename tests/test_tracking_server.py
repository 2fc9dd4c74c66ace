"""Logging to a real `mlflow server` started on localhost (what users do with a shared tracking server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from dopd.pipeline import run
from tests.conftest import CONF, FAST, compose_cfg, free_port

ROOT = Path(CONF).parent


@contextmanager
def _server(tmp_path):
    """(uri, process) of an `mlflow server` in its own process group, stopped at the end unless already dead."""
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        yield uri, proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    with _server(tmp_path) as (uri, _):
        yield uri


@pytest.mark.slow
def test_run_logs_to_a_tracking_server(mlflow_server, tmp_path, capsys):
    from dopd.tracking import print_job_link

    run(compose_cfg([*FAST, "router=dopd", f"logger.tracking_uri={mlflow_server}"], tmp_path))
    client = mlflow.MlflowClient(mlflow_server)
    (r,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    assert r.info.status == "FINISHED" and r.info.run_name.startswith("dopd-seed1-model=tiny_random,")
    assert {"train/loss", "eval/acc/avg"} <= set(r.data.metrics)
    paths = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert "config.yaml" in paths and "routing" in paths  # artifacts went through the server
    print_job_link()  # what train.py's job end prints: the server's own UI
    link = f"{mlflow_server}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}?workflowType=machine_learning"
    assert f"MLflow run {r.info.run_name}: {link}\n" in capsys.readouterr().out


BOUND_S = 60  # what a dead server may cost a job: with logger.http_* at their defaults, seconds in practice


@pytest.mark.slow
def test_a_server_that_dies_mid_run_ends_the_job_in_bounded_time(tmp_path):
    """The server is killed after the job's first metric and checkpoint: the job exits non-zero within BOUND_S
    (MLflow's own retries would take over 10 minutes) with one line naming the server, the checkpoint and resume."""
    out = tmp_path / "job"
    with _server(tmp_path) as (uri, server):
        job = [o for o in FAST if not o.startswith("trainer.max_steps")] + [
            "router=dopd", "trainer.max_steps=100000", "checkpoint_every=1", f"paths.output_dir={out}",
            f"logger.tracking_uri={uri}", f"hydra.run.dir={out}/runs/x"]
        proc = subprocess.Popen([sys.executable, "train.py", *job], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            client = mlflow.MlflowClient(uri)
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                exp = client.get_experiment_by_name("dopd")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if runs and runs[0].data.metrics and list(out.glob("runs/x/checkpoints/last.ckpt")):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            os.killpg(server.pid, signal.SIGKILL)
            killed = time.time()
            try:
                text, _ = proc.communicate(timeout=BOUND_S + 60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the job still runs {BOUND_S + 60} s after its tracking server died")
            took = time.time() - killed
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"job exited {took:.1f} s after its tracking server died; its last lines:\n{text[-1500:]}")
    assert proc.returncode != 0
    assert took < BOUND_S, f"{took:.0f} s"
    assert f"MLflow tracking server {uri} stopped answering" in text, text[-3000:]
    assert "resume=true" in text
    assert list(out.glob("runs/x/checkpoints/last.ckpt"))
