"""End to end on tiny random models: every router trains, logs to MLflow, and keeps the teacher frozen."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from dopd.pipeline import run
from tests.conftest import FAST, compose_cfg
from tests.test_configs import options


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("dopd")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("router", options("router"))
def test_every_router_trains_and_logs(router, tmp_path, tracking_uri):
    cfg = compose_cfg([*FAST, f"router={router}", f"logger.tracking_uri={tracking_uri}"], tmp_path)
    acc = run(cfg)
    assert 0.0 <= acc <= 1.0
    client, runs = _runs(tracking_uri)
    (r,) = runs
    assert r.info.status == "FINISHED" and r.info.run_name.startswith(f"{router}-seed1-model=tiny_random,")
    assert r.data.tags["router"] == router and r.data.tags["pair"] == "tiny-random"
    assert r.data.params["router/name"] == router
    for key in ("train/loss", "train/entropy", "train/response_len", "eval/acc/test", "eval/acc/ood", "eval/acc/avg"):
        assert key in r.data.metrics, key
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "eval/acc/test")]
    assert steps[0] == 0 and steps[-1] == 2
    if router == "dopd":
        fracs = [r.data.metrics[f"train/regime/{k}/frac"] for k in ("LH", "LL", "HT", "HS")]
        assert abs(sum(fracs) - 1) < 1e-6
    assert "config.yaml" in [a.path for a in client.list_artifacts(r.info.run_id)]


def test_a_pretrained_student_trains_in_training_mode(tmp_path, tracking_uri, monkeypatch):
    """from_pretrained loads models in eval mode and Lightning keeps a module's mode at fit, so the module must
    switch the student to training mode itself (dropout, HF gradient checkpointing); the teacher stays in eval."""
    cfg = compose_cfg([*FAST, "model=arith_pair", f"logger.tracking_uri={tracking_uri}"], tmp_path)
    assert cfg.model.student.source == "pretrained"
    from dopd import pipeline

    modes = []

    class Spy(pipeline.DistillModule):
        def training_step(self, batch, batch_idx):
            modes.append((self.student.training, self.teacher.training))
            return super().training_step(batch, batch_idx)

    monkeypatch.setattr(pipeline, "DistillModule", Spy)
    run(cfg)
    assert modes and all(m == (True, False) for m in modes)


def test_teacher_frozen_out_of_optimizer_and_checkpoint(tmp_path, tracking_uri):
    cfg = compose_cfg([*FAST, "router=dopd", f"logger.tracking_uri={tracking_uri}", "checkpoint_every=1"], tmp_path)
    from dopd import pipeline

    captured = {}
    real = pipeline.DistillModule

    class Spy(real):
        def on_train_end(self):
            super().on_train_end()
            captured["module"] = self

    pipeline.DistillModule = Spy
    try:
        teacher_before = None
        run(cfg)
    finally:
        pipeline.DistillModule = real
    module = captured["module"]
    assert not module.teacher.training
    assert all(not p.requires_grad for p in module.teacher.parameters())
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.student.parameters()}
    assert all(p.grad is None for p in module.teacher.parameters())
    del teacher_before
    ckpt = torch.load(Path(tmp_path) / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student.") for k in ckpt["state_dict"])


def test_file_store_is_rejected_with_a_fix(tmp_path):
    cfg = compose_cfg([*FAST, f"logger.tracking_uri=file:{tmp_path}/mlruns"], tmp_path)
    with pytest.raises(ValueError, match="sqlite"):
        run(cfg)


def test_same_seed_and_config_give_identical_metrics(tmp_path):
    histories = []
    for i in range(2):
        uri = f"sqlite:///{tmp_path}/m{i}.db"
        run(compose_cfg([*FAST, "router=dopd", "trainer.max_steps=3", f"logger.tracking_uri={uri}"], tmp_path / str(i)))
        client, (r,) = _runs(uri)
        histories.append({k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                          for k in ("train/loss", "train/entropy", "eval/acc/avg", "train/regime/HT/frac")})
    assert histories[0] == histories[1]
    assert len(histories[0]["train/loss"]) == 3


def test_micro_batches_evaluate_once_per_optimizer_step(tmp_path, tracking_uri):
    """Loss micro-batches (optim.micro_batch_size, how the GPU configs fit 150k-vocabulary logits) and generation
    calls (rollout.batch_size) cut one optimizer step: evaluation, metrics and the step count follow optimizer steps."""
    cfg = compose_cfg([*FAST, "router=dopd", "data.batch_size=4", "optim.micro_batch_size=2", "rollout.batch_size=4",
                       f"logger.tracking_uri={tracking_uri}"], tmp_path)
    run(cfg)
    client, (r,) = _runs(tracking_uri)
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "eval/acc/test")]
    assert steps == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [0, 1]
    assert abs(sum(r.data.metrics[f"train/regime/{k}/frac"] for k in ("LH", "LL", "HT", "HS")) - 1) < 1e-6
