"""Shared fixtures: composed Hydra configs on tiny random models, and a throwaway MLflow store."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

import dopd

CONF = str(dopd.PROJECT_ROOT / "conf")
torch.set_num_threads(1)

# Overrides that make any router run in seconds on random weights.
FAST = ["model=tiny_random", "trainer.max_steps=2", "eval.every=1", "data.n_eval=8", "data.n_train=64",
        "data.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=8", "rich_progress=false",
        "+trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false"]


def compose_cfg(overrides: list[str], tmp_path: Path | None = None):
    """Compose conf/train.yaml as Hydra would, with hydra's own node, outputs redirected under tmp_path."""
    GlobalHydra.instance().clear()
    extra = []
    if tmp_path is not None:
        extra = [f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *extra], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def one_distillation_step(module, examples):
    """One update by hand through the module's own pieces: rollouts, the aligned passes, the routed loss and its
    backward. Checks a finite loss, every target aligned with the student's logits, and gradients in the student
    only (the frozen teacher gets none); returns (rollout, targets, routed output) for further checks."""
    from dopd.routing import routed_loss

    module.student.zero_grad(set_to_none=True)
    roll = module.rollouts(examples)
    student_logits, targets = module.forward_passes(roll)
    assert set(targets) == module.router.passes
    assert all(t.shape == student_logits.shape for t in targets.values())
    out = routed_loss(module.router, student_logits, roll.tokens, roll.mask, **targets)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    return roll, targets, out
