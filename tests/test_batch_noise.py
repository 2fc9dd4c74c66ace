"""scripts/batch_noise.py and the learning-rate schedule it shares with DistillModule."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import dopd
from tests.conftest import compose_cfg
from dopd.optim import lr_schedule

spec = importlib.util.spec_from_file_location("batch_noise", dopd.PROJECT_ROOT / "scripts" / "batch_noise.py")
batch_noise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(batch_noise)


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    f = lr_schedule({"warmup_steps": 4, "min_lr_ratio": 0.1}, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f(s) >= f(s + 1) for s in range(4, 12))
    const = lr_schedule({"warmup_steps": 2, "scheduler": "constant"}, total_steps=10)
    assert [const(s) for s in (0, 1, 2, 9, 30)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_schedule({"warmup_steps": 0}, total_steps=10)(0) == 1.0  # no warmup
    assert lr_schedule({}, total_steps=100)(0) == 1 / compose_cfg([]).optim.warmup_steps  # the YAML's defaults


def test_gold_batches_repeat_each_solution_like_rollouts():
    from dopd.pipeline import build_task, build_view
    from dopd.tokenizer import char_tokenizer

    cfg = batch_noise.compose([])
    task, tok = build_task(cfg.task), char_tokenizer()
    view = build_view(cfg, tok)
    examples = task.examples("train", 2, 0)
    ctx, ids, mask = batch_noise.gold_batch(view, examples, 3)
    assert ctx.input_ids.shape[0] == ids.shape[0] == 6
    assert torch.equal(ids[0], ids[2]) and torch.equal(ctx.input_ids[3], ctx.input_ids[5])
    first = tok.decode(ids[0][mask[0]].tolist(), skip_special_tokens=True)
    assert first == examples[0].solution


@pytest.mark.parametrize("target", batch_noise.TARGETS)
def test_each_target_trains_the_zoo_student_and_writes_its_curve(target, tmp_path):
    out = tmp_path / "curve.json"
    argv = ["--target", target, "--every", "1", "--json", str(out), "trainer.max_steps=2", "data.batch_size=2",
            "rollout.n=2", "data.n_eval=6", "optim.lr=1e-2", "optim.warmup_steps=0"]
    assert batch_noise.main(argv) == 0
    curve = json.loads(out.read_text())["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2]
    assert all(0.0 <= c[k] <= 1.0 for c in curve for k in ("acc/test", "acc/ood", "acc/avg"))


def test_a_router_with_privileged_targets_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="needs a router whose only target is the teacher"):
        batch_noise.main(["--target", "teacher", "router=dopd"])
