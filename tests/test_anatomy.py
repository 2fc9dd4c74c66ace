"""dopd.anatomy: the per-regime probe of a training run (shares, the gradient each rule sends, target vs student)."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from dopd.anatomy import probe
from dopd.routing import REGIMES
from tests.test_step import _module


@pytest.mark.parametrize("form", ["stepwise", "none"])
def test_probe_shares_add_up_and_the_self_anchor_is_silent_in_the_true_control(form):
    torch.manual_seed(0)
    module, task = _module(["router=dopd", f"task.hint_form={form}"])
    out = probe(module, task.examples("train", 4, 0))
    assert sum(out[f"anatomy/{r}/share"] for r in REGIMES) == pytest.approx(1.0)
    for r in REGIMES:
        kinds = [k for k in out if k.startswith(f"anatomy/{r}/") and k.endswith("/share") and k.count("/") == 3]
        assert sum(out[k] for k in kinds) == pytest.approx(out[f"anatomy/{r}/share"]), r
    assert out["anatomy/HT/grad_norm"] > 0
    anchors = [out["anatomy/LL/grad_norm"], out["anatomy/HS/grad_norm"]]
    if form == "none":  # p empty: the self-anchor's target is the student itself, so its rules move nothing
        assert anchors == [0.0, 0.0]
        assert out["anatomy/HS/q_target"] == pytest.approx(out["anatomy/HS/q_student"], rel=1e-5)
    else:
        assert max(anchors) > 0
    assert all(p.grad is None for p in module.student.parameters())  # the probe leaves no gradient behind


def test_train_py_logs_the_probe_to_mlflow(tmp_path, tracking_uri):
    from dopd.pipeline import run
    from tests.conftest import FAST, compose_cfg

    run(compose_cfg([*FAST, "router=dopd", "callbacks=anatomy", "callbacks.anatomy.every=1",
                     "callbacks.anatomy.prompts=2", f"logger.tracking_uri={tracking_uri}"], tmp_path))
    client = mlflow.MlflowClient(tracking_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "anatomy/HT/grad_norm")]
    assert steps == [0, 1, 2] and math.isfinite(r.data.metrics["anatomy/LH/share"])
    figure = _script("collapse_figure")
    assert figure.main(["dopd", "--all", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "fig")]) == 0
    rows = (tmp_path / "fig" / "collapse.csv").read_text().splitlines()
    assert (tmp_path / "fig" / "collapse.png").stat().st_size > 0
    grad = [row.split(",") for row in rows if row.startswith("anatomy/HT/grad_norm,")]
    history = client.get_metric_history(r.info.run_id, "anatomy/HT/grad_norm")
    assert [float(g[2]) for g in grad] == pytest.approx([m.value for m in history], rel=1e-5)  # the figure's numbers


def _script(name):
    import importlib.util

    import dopd

    spec = importlib.util.spec_from_file_location(name, dopd.PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
