"""A real multirun through train.py: one MLflow parent run, uniquely named children with params and metrics."""

from __future__ import annotations

import re
import subprocess
import sys

import mlflow
import pytest

from dopd import tracking
from tests.conftest import CONF, FAST, compose_cfg


@pytest.mark.slow
def test_multirun_nests_children_under_one_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "train.py", "-m", "router=vanilla,dopd", "seed=1", *FAST, f"logger.tracking_uri={uri}",
           f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=CONF.rsplit("/", 1)[0], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("dopd")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3.x opens it on its runs
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.info.run_name for c in children) == ["dopd-seed1", "vanilla-seed1"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.params["router/name"] == c.data.tags["router"]
        assert {"train/loss", "eval/acc/avg"} <= set(c.data.metrics)
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # the parent: a whole readable name, the swept keys as params, a description, the children's summary
    assert re.fullmatch(r"sweep-\d{4}-\d{6}", parent.info.run_name), parent.info.run_name
    assert parent.data.params == {"sweep/router": "vanilla,dopd"}
    note = parent.data.tags["mlflow.note.content"]
    assert "python train.py -m router=vanilla,dopd" in note and "2 jobs" in note and "`model=tiny_random`" in note
    by_router = {c.data.tags["router"]: c for c in children}
    for router, child in by_router.items():
        for m in ("eval/acc/avg", "eval/acc/test"):
            assert parent.data.metrics[f"summary/router:{router}/{m}/mean"] == pytest.approx(child.data.metrics[m])
        assert parent.data.metrics[f"summary/router:{router}/eval/acc/avg/n"] == 1
        assert f"summary/router:{router}/eval/acc/avg/std" not in parent.data.metrics  # one seed: no std
    assert "summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = open(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read()
    assert "| vanilla |" in table and "| dopd |" in table and "Avg" in table
    # printed: each job's link, the table and the sweep's links (the default `make ui` address for SQLite)
    out = res.stdout
    base, eid = "http://127.0.0.1:5000/#/experiments/", exp.experiment_id
    for c in children:
        assert f"MLflow run {c.info.run_name}: {base}{eid}/runs/{c.info.run_id}?workflowType=machine_learning" in out
    assert f"MLflow sweep {parent.info.run_name}: {base}{eid}/runs/{parent.info.run_id}?workflowType=" in out
    assert f"{base}{eid}?workflowType=machine_learning" in out and "| dopd |" in out
    # job folders name their overrides (where outputs and the store go is left out)
    (sweep,) = (tmp_path / "multiruns").iterdir()
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [n.split("_", 1)[0] for n in names] == ["0", "1"]
    assert "router=vanilla" in names[0] and "router=dopd" in names[1] and "tracking_uri" not in names[0]


def test_sweep_params_and_description_name_what_varies():
    overrides = ["router=vanilla,dopd", "seed=range(1,4)", "trainer.max_steps=2"]
    swept = tracking.sweep_values(overrides)
    assert swept == {"router": ["vanilla", "dopd"], "seed": ["1", "2", "3"]}
    note = tracking.sweep_description(overrides, swept, "mine")
    assert "`python train.py -m router=vanilla,dopd seed=range(1,4) trainer.max_steps=2`" in note
    assert "6 jobs" in note and "`seed` ∈ {1, 2, 3}" in note and "Fixed for every child: `trainer.max_steps=2`" in note


def test_links_open_the_runs_in_the_ui():
    sqlite, server = "sqlite:///outputs/mlflow.db", "http://127.0.0.1:5001/"
    assert (tracking.run_link(sqlite, "3", "abc")
            == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert tracking.experiment_link(server, "3") == "http://127.0.0.1:5001/#/experiments/3?workflowType=machine_learning"
    import dopd

    assert tracking._serve_hint(f"sqlite:///{dopd.PROJECT_ROOT}/outputs/mlflow.db") == " (serve it with `make ui`)"
    assert "mlflow ui --backend-store-uri sqlite:////x/y.db" in tracking._serve_hint("sqlite:////x/y.db")


def test_a_single_run_is_named_by_its_overrides_that_change_results(tmp_path):
    cfg = compose_cfg(["router=dopd", "seed=2", "trainer.max_steps=7", "router.top_k=4", "rich_progress=false",
                       "+trainer.enable_model_summary=false", f"logger.tracking_uri=sqlite:///{tmp_path}/x.db"],
                      tmp_path)
    assert tracking.run_name(cfg) == "dopd-seed2-trainer.max_steps=7,router.top_k=4"
    cfg = compose_cfg(["router=dopd"], tmp_path)
    assert tracking.run_name(cfg) == "dopd-seed1"
    from dopd.checkpoints import NOT_IN_JOB_KEY

    assert set(tracking.NOT_IN_RUN_NAME) == set(NOT_IN_JOB_KEY)  # what cannot change a result names no run


@pytest.mark.slow
def test_a_failing_job_is_marked_failed_and_the_sweep_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fast = [o for o in FAST if not o.startswith("rollout.max_new_tokens")]
    cmd = [sys.executable, "train.py", "-m", "router=vanilla", "rollout.max_new_tokens=0,8", *fast,
           f"logger.tracking_uri={uri}", f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=CONF.rsplit("/", 1)[0], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "1 job(s) of this sweep failed" in res.stdout + res.stderr
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    children = {r.data.tags["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    # The bad value is a config error: caught before its MLflow run opens, so it leaves no FAILED run behind
    assert set(children) == {"vanilla-seed1-rollout.max_new_tokens=8"}
    assert "rollout.max_new_tokens=0 must be > 0" in res.stdout + res.stderr
    good = children["vanilla-seed1-rollout.max_new_tokens=8"]
    assert good.info.status == "FINISHED" and "eval/acc/avg" in good.data.metrics
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "1"
    # the summary covers the finished child (keys without `=`, which MLflow refuses in metric names)
    assert parent.data.metrics["summary/rollout.max_new_tokens:8/eval/acc/avg/n"] == 1
    assert parent.data.params == {"sweep/rollout.max_new_tokens": "0,8"}


@pytest.mark.slow
def test_parallel_joblib_sweep_into_one_sqlite_store_loses_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "router=vanilla,dopd",
           "seed=1,2", *FAST, f"logger.tracking_uri={uri}", f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=CONF.rsplit("/", 1)[0], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.info.run_name for c in children) == ["dopd-seed1", "dopd-seed2", "vanilla-seed1", "vanilla-seed2"]
    assert len({c.data.tags["mlflow.parentRunId"] for c in children}) == 1
    for c in children:
        assert c.info.status == "FINISHED"
        history = client.get_metric_history(c.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [0, 1]  # every step's metric arrived
        assert [m.step for m in client.get_metric_history(c.info.run_id, "eval/acc/avg")] == [0, 1, 2]


def test_concurrent_first_use_of_a_new_sqlite_store(tmp_path):
    """Several processes opening a fresh database at once must not race MLflow's schema migration."""
    uri = f"sqlite:///{tmp_path}/new.db"
    code = ("import sys, mlflow; from dopd.tracking import check_tracking_uri; check_tracking_uri(sys.argv[1]); "
            "c = mlflow.MlflowClient(sys.argv[1]); c.create_experiment('e' + sys.argv[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)[-3000:]
    names = {e.name for e in mlflow.MlflowClient(uri).search_experiments()}
    assert {"e0", "e1", "e2"} <= names


@pytest.mark.slow
def test_a_killed_sweep_relaunched_with_resume_continues_under_its_parent(tmp_path):
    """The documented sweep recovery: a 2-job sweep SIGKILLed after its first job's checkpoint, relaunched with the
    same command plus resume=true, ends as one FINISHED parent with both children FINISHED under it, which
    dopd.report finds (before, the resumed run stayed under the old RUNNING parent and the new one was empty)."""
    import os
    import signal
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = [o for o in FAST if not o.startswith(("trainer.max_steps", "eval.every"))]
    cmd = [sys.executable, "train.py", "-m", "router=vanilla,dopd", "seed=1", *job, "trainer.max_steps=8",
           "eval.every=4", "checkpoint_every=2", f"logger.tracking_uri={uri}", f"paths.output_dir={tmp_path}",
           "logger.sweep_name=recover"]
    root = CONF.rsplit("/", 1)[0]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob("multiruns/*/0_*/checkpoints/last.ckpt")) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("multiruns/*/0_*/checkpoints/last.ckpt")), "no checkpoint before the kill"
    assert not list(tmp_path.glob("multiruns/*/1_*/checkpoints/last.ckpt")), "killed too late"

    res = subprocess.run([*cmd, "resume=true"], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3, [r.info.run_name for r in runs]
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.info.run_name == "recover"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.info.run_name for c in children) == ["dopd-seed1", "vanilla-seed1"]
    assert "resume=true: continuing the sweep recover" in res.stderr + res.stdout
    rep = subprocess.run([sys.executable, "-m", "dopd.report", "dopd", "--sweep", "recover", "--tracking-uri", uri,
                          "--curves", ""], cwd=root, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "| vanilla |" in rep.stdout and "| dopd |" in rep.stdout, rep.stdout[-3000:]


def test_a_sweep_whose_config_fails_to_compose_leaves_no_running_parent(tmp_path):
    """A job override that names no option fails the sweep's compose: the parent run, if opened, ends FAILED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "train.py", "-m", "router=vanilla,nonexistent_router", *FAST, f"logger.tracking_uri={uri}",
           f"paths.output_dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=CONF.rsplit("/", 1)[0], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "nonexistent_router" in res.stderr
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(uri)
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
