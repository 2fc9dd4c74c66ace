"""One optimizer step is one batch, whatever its cut: generation calls and loss micro-batches change memory, not math.

Eq. 11 is the mean over the step's sequences of each one's mean token loss, and with `router.gap.scope=step` the
router's bars (DOPD's A_bar, qS_bar, qT_bar; EOPD's and TIP's; pruning) are over the step's tokens. So the
gradient accumulated over micro-batches must equal the gradient of the step computed in one piece, for every
router, and so must the regimes; `scope=micro_batch` is the per-micro-batch variant and differs.
"""

from __future__ import annotations

import pytest
import torch

from dopd.models import load_pair
from dopd.module import DistillModule
from dopd.pipeline import build_router, build_task, build_view, check_step_sizes
from dopd.routing import routed_loss
from tests.conftest import FAST, compose_cfg
from tests.test_configs import options

STEP = [*FAST, "data.batch_size=4", "rollout.n=2", "rollout.max_new_tokens=8", "task.hint_form=stepwise"]


def _module(overrides):
    cfg = compose_cfg([*STEP, *overrides])
    pair = load_pair(dict(cfg.model))
    task = build_task(cfg.task)
    module = DistillModule(pair.student, pair.teacher, build_view(cfg, pair.tokenizer), build_router(cfg.router), task,
                           rollout=dict(cfg.rollout), optim=dict(cfg.optim), eval=dict(cfg.eval))
    return module, task


def _gradient(module, parts) -> torch.Tensor:
    module.student.zero_grad(set_to_none=True)
    module.prune_generator.manual_seed(0)
    loss, _ = module.step_gradient(parts)
    return loss, torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])


@pytest.mark.parametrize("router", [*options("router"), "dopd_pruned", "dopd_zscore"])
def test_micro_batched_step_has_the_whole_steps_gradient(router):
    extra = {"dopd_pruned": ["router=dopd", "router.prune.fraction=0.3", "router.prune.by=high_gap"],
             "dopd_zscore": ["router=dopd", "router.gap.normalize=zscore"]}.get(router, [f"router={router}"])
    torch.manual_seed(0)
    whole, task = _module(extra)
    roll = whole.rollouts(task.examples("train", 4, 0))  # 8 rows, one call
    loss, grad = _gradient(whole, [roll])
    cut, _ = _module([*extra, "optim.micro_batch_size=2"])
    parts = cut.micro_batches([roll])
    assert len(parts) == 4 and sum(p.tokens.shape[0] for p in parts) == 8
    cut_loss, cut_grad = _gradient(cut, parts)
    assert torch.allclose(cut_loss, loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(cut_grad, grad, rtol=1e-4, atol=1e-7), (cut_grad - grad).abs().max()
    assert grad.abs().sum() > 0


def _regimes(module, parts):
    selections, _ = module.step_selection(parts)
    outs = []
    for part, sel in zip(parts, selections):
        logits, targets = module.forward_passes(part)
        outs.append(routed_loss(module.router, logits.detach(), part.tokens, part.mask, selection=sel, **targets))
    return torch.cat([o.regime[p.mask] for o, p in zip(outs, parts)]), outs[0].stats


def test_step_scope_thresholds_and_regimes_are_the_whole_steps():
    torch.manual_seed(1)
    whole, task = _module(["router=dopd"])
    roll = whole.rollouts(task.examples("train", 4, 0))
    regimes, stats = _regimes(whole, [roll])
    cut, _ = _module(["router=dopd", "optim.micro_batch_size=2"])
    parts = cut.micro_batches([roll])
    cut_regimes, cut_stats = _regimes(cut, parts)
    assert torch.equal(cut_regimes, regimes)
    for key in ("gap/a_bar", "gap/qs_bar", "gap/qt_bar"):
        assert cut_stats[key] == pytest.approx(stats[key], rel=1e-6), key
    # The per-micro-batch variant takes each micro-batch's own bars: other thresholds, other regimes.
    local, _ = _module(["router=dopd", "optim.micro_batch_size=2", "router.gap.scope=micro_batch"])
    local_regimes, local_stats = _regimes(local, parts)
    assert local_stats["gap/a_bar"] != pytest.approx(stats["gap/a_bar"], rel=1e-6)
    assert not torch.equal(local_regimes, regimes)


def test_recomputed_targets_give_the_kept_targets_gradient():
    torch.manual_seed(2)
    kept, task = _module(["router=dopd", "optim.micro_batch_size=2"])
    roll = kept.rollouts(task.examples("train", 4, 0))
    _, grad = _gradient(kept, kept.micro_batches([roll]))
    again, _ = _module(["router=dopd", "optim.micro_batch_size=2", "optim.keep_targets=false"])
    _, grad_again = _gradient(again, again.micro_batches([roll]))
    assert torch.equal(grad, grad_again)


def test_step_rollouts_come_in_calls_of_rollout_batch_size_rows():
    torch.manual_seed(3)
    module, task = _module(["rollout.batch_size=4"])
    calls = module.step_rollouts(task.examples("train", 4, 0))
    assert [c.tokens.shape[0] for c in calls] == [4, 4]
    one, _ = _module([])
    assert [c.tokens.shape[0] for c in one.step_rollouts(task.examples("train", 4, 0))] == [8]


@pytest.mark.parametrize("overrides, message", [
    (["optim.micro_batch_size=3"], r"optim.micro_batch_size=3 must be .* divides a process's 8 rows .* \[2, 4, 8\]"),
    (["rollout.batch_size=6"], r"rollout.batch_size=6 must be .* one of \[2, 4, 8\]"),
    (["trainer=ddp_cpu", "data.batch_size=3"], r"data.batch_size=3 must be divisible by the 2 processes"),
    (["+trainer.accumulate_grad_batches=2"], r"trainer.accumulate_grad_batches=2: one batch is one optimizer step"),
])
def test_step_sizes_that_do_not_divide_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_step_sizes(compose_cfg([*STEP, *overrides]))
