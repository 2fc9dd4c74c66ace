"""Logging to a real `mlflow server` started on localhost (what users do with a shared tracking server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from dopd.pipeline import run
from tests.conftest import FAST, compose_cfg, free_port



@pytest.fixture
def mlflow_server(tmp_path):
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
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


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
