"""The true control: with p empty, (x, p) is x token for token, so the control differs from its treatment only in p.

Then the privileged student is the student itself: DOPD's self-anchor rules (LL, HS) pull toward the trained
student's own distribution and must move nothing, so DOPD trains exactly like `ablation=t8_no_student`.
"""

from __future__ import annotations

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from dopd.models import load_pair
from dopd.module import DistillModule
from dopd.pipeline import build_router, build_task, build_view, run
from dopd.routing import routed_loss
from dopd.tasks.base import Example
from dopd.view import PrivilegedView
from tests.conftest import FAST, compose_cfg

CONTROL = [*FAST, "task.hint_form=none"]


@pytest.mark.parametrize("task", ["arith", "reason", "jsonl", "champ"])
@pytest.mark.parametrize("chat", [False, True])
def test_empty_hint_makes_the_privileged_text_the_plain_one(task, chat):
    from tests.test_real_models import TOK  # a Qwen3-style chat tokenizer made in code

    cfg = compose_cfg([f"task={task}"])
    v = cfg.task.view
    ex = Example(question="3+4=?", hint="", answer="7", solution="7")
    view = PrivilegedView(TOK, plain=v.plain, privileged=v.privileged, empty_hint=v.empty_hint, chat=chat)
    assert view.text(ex, privileged=True) == view.text(ex, privileged=False)
    hinted = Example(question="3+4=?", hint="add", answer="7", solution="7")
    assert view.text(hinted, privileged=True) != view.text(hinted, privileged=False)
    header = PrivilegedView(TOK, plain=v.plain, privileged=v.privileged, empty_hint="template", chat=chat)
    assert header.text(ex, privileged=True) != header.text(ex, privileged=False)  # the named header variant


def test_empty_hint_makes_the_privileged_vision_context_the_plain_one():
    from tests.test_vision import VISION

    cfg = compose_cfg([*VISION, "task.hint_form=none"])
    pair = load_pair(dict(cfg.model))
    view = build_view(cfg, pair.tokenizer, pair.processor)
    rows = build_task(cfg.task).examples("train", 3, 0)
    assert all(ex.hint == "" for ex in rows)
    assert view.contexts(rows, privileged=True).equals(view.contexts(rows, privileged=False))


def test_an_unknown_empty_hint_mode_is_one_line():
    from tests.test_real_models import TOK

    with pytest.raises(ValueError, match=r"task.view.empty_hint='header' is not one of \('plain', 'template'\)"):
        PrivilegedView(TOK, empty_hint="header")


def _self_anchor_grad_norm(overrides: list[str]) -> float:
    """One step's gradient norm in the student from DOPD's self-anchor rules alone (LH and HT dropped)."""
    cfg = compose_cfg([*CONTROL, "router=dopd", "router.rules.LH=null", "router.rules.HT=null", *overrides])
    torch.manual_seed(0)
    pair = load_pair(dict(cfg.model))
    task = build_task(cfg.task)
    module = DistillModule(pair.student, pair.teacher, build_view(cfg, pair.tokenizer), build_router(cfg.router),
                           task, rollout=dict(cfg.rollout), optim=dict(cfg.optim), eval=dict(cfg.eval))
    roll = module.rollouts(task.examples("train", 4, 0))
    student_logits, targets = module.forward_passes(roll)
    out = routed_loss(module.router, student_logits, roll.tokens, roll.mask, **targets)
    assert out.stats["regime/LL/frac"] + out.stats["regime/HS/frac"] > 0.2  # the rules do cover tokens
    out.loss.backward()
    grads = [p.grad.flatten() for p in module.student.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def test_the_self_anchor_sends_no_gradient_in_the_control():
    assert _self_anchor_grad_norm([]) == 0.0
    # The header variant (an empty hint still inside "H:...\n") is a different context: the rules then move the student.
    assert _self_anchor_grad_norm(["task.view.empty_hint=template"]) > 0.0


def _train(overrides, folder, uri):
    run(compose_cfg([*CONTROL, "trainer.max_steps=4", "export_student=true", f"logger.tracking_uri={uri}",
                     *overrides], folder))
    client = mlflow.MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("dopd").experiment_id])
    losses = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")]
    return losses, load_file(str(folder / "run" / "student" / "model.safetensors"))


def test_dopd_trains_exactly_like_its_no_student_ablation_in_the_control(tmp_path):
    losses, weights = _train(["router=dopd"], tmp_path / "dopd", f"sqlite:///{tmp_path}/a.db")
    ab_losses, ab_weights = _train(["ablation=t8_no_student"], tmp_path / "ab", f"sqlite:///{tmp_path}/b.db")
    assert len(losses) == 4 and losses == ab_losses
    assert weights.keys() == ab_weights.keys()
    assert all(torch.equal(weights[k], ab_weights[k]) for k in weights)
    initial = load_pair(dict(compose_cfg(CONTROL).model)).student.state_dict()
    assert any(not torch.equal(weights[k], initial[k]) for k in weights if k in initial)  # it did train
