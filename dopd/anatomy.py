"""What each regime does to the student over training: a Lightning callback that probes a fixed set of prompts.

Every `every` optimizer steps (and before the first) it samples `rollout.n` responses per probe prompt from the
current student (its own RNG: training is not disturbed), runs the router's passes, and logs to the run's MLflow:

    anatomy/<regime>/share                 fraction of the probe's response tokens in the regime
    anatomy/<regime>/<kind>/share          the same, per kind of token (the task's `token_kinds`, plus `eos`)
    anatomy/<regime>/grad_norm             norm of the gradient the regime's rule alone sends into the student
    anatomy/<regime>/q_target              mean probability of the sampled token under the regime's rule target
    anatomy/<regime>/q_student             ... under the trained student (x alone), the side being pulled
    anatomy/<regime>/eos_q_student         ... at EOS tokens only (nan when the regime has none)

Enabled from the command line: `python train.py +callbacks.anatomy._target_=dopd.anatomy.CollapseProbe
+callbacks.anatomy.every=25` (see `conf/callbacks/anatomy.yaml`); `scripts/collapse_figure.py` plots its runs.
"""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import torch

from dopd.routing import REGIMES, routed_loss
from dopd.view import response_logits
from dopd.visualize import token_strings


class CollapseProbe(L.Callback):
    def __init__(self, every: int = 25, prompts: int = 32, seed: int = 0):
        if every <= 0 or prompts <= 0:
            raise ValueError(f"callbacks.anatomy: every={every} and prompts={prompts} must be > 0")
        self.every, self.prompts, self.seed = every, prompts, seed

    def on_train_start(self, trainer, module):
        self.examples = trainer.datamodule.train_examples[: self.prompts]
        if trainer.global_step == 0:
            self._probe(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._probe(trainer, module)

    @torch.random.fork_rng()
    def _probe(self, trainer, module) -> None:
        torch.manual_seed(self.seed + trainer.global_step)
        metrics = probe(module, self.examples)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def probe(module, examples) -> dict[str, float]:
    """The figures above for one sample of `examples` (a DistillModule with a gap router, e.g. DOPD)."""
    spec = module.router
    if not spec.routes:
        raise ValueError(f"callbacks.anatomy needs a router that routes by the gap (e.g. router=dopd), not {spec.name!r}")
    student, tok = module.student, module.view.tok
    roll = module.rollouts(examples)
    was_training = student.training
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            _, targets = module.forward_passes(roll)
            plain = module.view.contexts(roll.examples, privileged=False, device=module.device)
            q_plain = response_logits(student, plain, roll.tokens, roll.mask, roll.n).log_softmax(-1)
        mask, tokens = roll.mask, roll.tokens
        kinds_of = getattr(module.task, "token_kinds", None)
        kinds = [kinds_of(p) if kinds_of else ["token"] * len(p) for p in token_strings(tok, tokens)]
        eos = tokens == tok.eos_token_id
        picked = tokens.clamp_min(0).unsqueeze(-1)
        q_s = q_plain.gather(-1, picked).squeeze(-1).exp()  # the trained student's p(sampled token)
        of_kind = {kind: torch.tensor([[k == kind for k in row] for row in kinds], device=mask.device) & ~eos
                   for kind in sorted({k for row in kinds for k in row})}
        of_kind["eos"] = eos
        for i, name in enumerate(REGIMES):
            alone = replace(spec, rules={g: (spec.rules[g] if g == name else None) for g in spec.rules})
            student.zero_grad(set_to_none=True)
            logits, _ = module.forward_passes(roll, targets)
            res = routed_loss(alone, logits, tokens, mask, **targets)
            if res.loss.requires_grad:
                res.loss.backward()
            grads = [p.grad.flatten() for p in student.parameters() if p.grad is not None]
            out[f"anatomy/{name}/grad_norm"] = float(torch.cat(grads).norm()) if grads else 0.0
            sel = res.regime == i
            n, total = int(sel.sum()), int(mask.sum())
            out[f"anatomy/{name}/share"] = n / max(1, total)
            rule = spec.rule_list(name)[0] if spec.rule_list(name) else None
            out[f"anatomy/{name}/q_student"] = float(q_s[sel].mean()) if n else float("nan")
            out[f"anatomy/{name}/eos_q_student"] = float(q_s[sel & eos].mean()) if (sel & eos).any() else float("nan")
            if rule is not None:
                q_t = targets[rule.target].float().log_softmax(-1).gather(-1, picked).squeeze(-1).exp()
                out[f"anatomy/{name}/q_target"] = float(q_t[sel].mean()) if n else float("nan")
            for kind, where in of_kind.items():
                out[f"anatomy/{name}/{kind}/share"] = int((sel & where & mask).sum()) / max(1, total)
    finally:
        student.zero_grad(set_to_none=True)
        student.train(was_training)
    return out
