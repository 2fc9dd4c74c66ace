"""The LightningModule: a trainable student, a frozen teacher and the privileged view, driven by a router.

One training step, top to bottom (`training_step`):
  1. the student samples `rollout.n` responses per prompt from x alone (no grad, KV cache);
  2. the student scores them from its own context *with* grad: Pi_S(. | x, y<n) (a prompt's context runs once
     for its n rollouts, in this pass as in the no-grad ones);
  3. only the passes the router needs run without grad: teacher|x, teacher|x,p, student|x,p;
  4. `routed_loss` picks each token's target, divergence, scope and weight, and reduces per Eq. 11.
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from dataclasses import asdict

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torchmetrics import MeanMetric

from dopd.evaluation import domain_rows, outcomes
from dopd.metrics import step_diagnostics
from dopd.rollout import Rollout, sample
from dopd.routing import Gap, RouterSpec, assign_regimes, routed_loss
from dopd.view import PrivilegedView, response_logits
from dopd.visualize import regime_html, regime_png, rows_from_batch, token_strings


def forward_passes(student, teacher, view: PrivilegedView, router: RouterSpec, roll: Rollout, device=None,
                   section=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student logits (with grad) and the no-grad target logits the router asks for, all aligned to `roll.tokens`.

    Each context (x, or x with p) is built once and shared by the passes that read it; where (x, p) is x token for
    token (an empty p: the control), the privileged passes are the plain ones, so a self-anchor's target is the
    trained student's own logits, bit for bit. `section(name)`, a context manager entered around the "student",
    "teacher" and "student_priv" passes, is how `scripts/bench.py` times this very code; none by default.
    """
    section = section or (lambda name: contextlib.nullcontext())
    tokens, mask, need = roll.tokens, roll.mask, router.passes
    ctx = {("privileged" if router.student_context == "privileged" else "plain"): roll.context}

    def context(name):
        if name not in ctx:
            built = view.contexts(roll.examples, privileged=name == "privileged", device=device)
            other = ctx.get("plain" if name == "privileged" else "privileged")
            ctx[name] = other if other is not None and built.equals(other) else built
        return ctx[name]

    with section("student"):
        student_logits = response_logits(student, context(router.student_context), tokens, mask,
                                         shared_context_group(student, roll))
    targets = {}
    with torch.no_grad():
        with section("teacher"):
            if "teacher" in need:
                targets["teacher"] = response_logits(teacher, context("plain"), tokens, mask, roll.n)
            if "teacher_priv" in need:
                targets["teacher_priv"] = (targets["teacher"] if "teacher" in targets and
                                           context("privileged") is context("plain") else
                                           response_logits(teacher, context("privileged"), tokens, mask, roll.n))
        with section("student_priv"):
            if "student_priv" in need:
                if context("privileged") is context(router.student_context):
                    targets["student_priv"] = student_logits.detach()
                else:
                    targets["student_priv"] = response_logits(student, context("privileged"), tokens, mask, roll.n)
    return student_logits, targets


def shared_context_group(model, roll: Rollout) -> int:
    """How many rollouts share one context pass in the trained student pass: the prompt's n, unless gradient
    checkpointing is on (it turns the KV cache that the shared pass hands on off)."""
    # transformers 5 names the flag is_activation_checkpointing (is_gradient_checkpointing is deprecated); 4.x the latter
    on = getattr(model, "is_activation_checkpointing", None)
    on = getattr(model, "is_gradient_checkpointing", False) if on is None else on
    return 1 if on else roll.n


def lr_schedule(optim: dict, total_steps: int):
    """The `optim` block's learning-rate multiplier per step: linear warmup, then cosine to `min_lr_ratio` at
    `total_steps` (or constant). A function of its own so scripts can train with exactly the module's schedule."""
    warmup, floor = int(optim.get("warmup_steps", 0)), optim.get("min_lr_ratio", 0.0)
    constant = optim.get("scheduler", "cosine") == "constant"

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_optimizer(parameters, optim: dict, total_steps: int):
    """AdamW and its per-step LambdaLR schedule from the `optim` block: the module's optimizer, and the one
    `scripts/batch_noise.py` trains with so that its runs differ from a distillation run only in their data."""
    opt = torch.optim.AdamW(parameters, lr=optim["lr"], weight_decay=optim.get("weight_decay", 0.0),
                            betas=tuple(optim.get("betas", (0.9, 0.999))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(optim, total_steps))


class DistillModule(L.LightningModule):
    def __init__(self, student, teacher, view: PrivilegedView, router: RouterSpec, task, *, rollout: dict,
                 optim: dict, eval: dict, checkpoint_teacher: bool = False):
        super().__init__()
        self.student, self.teacher, self.view, self.router, self.task = student, teacher, view, router, task
        self.rollout_cfg, self.optim_cfg, self.eval_cfg = dict(rollout), dict(optim), dict(eval)
        self.checkpoint_teacher = checkpoint_teacher
        self.teacher.eval().requires_grad_(False)
        self.strict_loading = False  # the teacher is not in checkpoints unless asked for
        self.prune_generator = torch.Generator()
        self.nonfinite_steps = 0
        self.step_metrics: dict[str, float] = {}  # the last training step's metrics
        self._evaluated_at = -1  # the optimizer step of the student's latest evaluation

    # The frozen teacher stays in eval mode whatever Lightning does with the student.
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # -- training -----------------------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a batch is a list of text examples; the view builds tensors on the right device

    def rollouts(self, batch, n: int | None = None) -> Rollout:
        r = self.rollout_cfg
        return sample(self.student, self.view, batch, n=n or r["n"], privileged=self.router.student_context == "privileged",
                      max_new_tokens=r["max_new_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                      top_k=r.get("top_k", 0), engine=r.get("engine", "auto"))

    def forward_passes(self, roll: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return forward_passes(self.student, self.teacher, self.view, self.router, roll, self.device)

    def training_step(self, batch, batch_idx):
        roll = self.rollouts(batch)
        student_logits, targets = self.forward_passes(roll)
        out = routed_loss(self.router, student_logits, roll.tokens, roll.mask, generator=self.prune_generator, **targets)
        if not torch.isfinite(out.loss):
            return self._skip_nonfinite(out.loss)
        with torch.no_grad():
            entropy, diag = step_diagnostics(student_logits, targets, roll.mask, self.diag_top_k)
        self._warn_if_uniform(diag)
        n = len(roll.examples)
        metrics = {"train/loss": out.loss.detach(), "train/entropy": entropy,
                   "train/response_len": roll.lengths.float().mean(),
                   "train/eos_rate": (roll.tokens == self.view.tok.eos_token_id).any(-1).float().mean(),
                   "train/reward": self._accuracy(roll)}
        metrics.update({f"train/{k}": v for k, v in out.stats.items()})
        metrics.update({f"train/{k}": v for k, v in diag.items()})
        self.step_metrics = _floats(metrics)
        self._log_step(self.step_metrics)
        self.log("loss", out.loss.detach(), prog_bar=True, on_step=True, batch_size=n, logger=False)
        return out.loss

    def _log_step(self, metrics: dict[str, float]) -> None:
        """This rank's step metrics straight to the loggers (rank zero, every trainer.log_every_n_steps), as
        Lightning's on-step logging does: `self.log` costs ~2 ms per key, a tenth of a small CPU step at 20 keys."""
        every = max(1, int(self.trainer.log_every_n_steps or 1))
        if self.trainer.is_global_zero and (self.global_step + 1) % every == 0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    @property
    def diag_top_k(self) -> int:
        ks = [r.top_k for g in self.router.rules for r in self.router.rule_list(g) if r.scope == "topk"]
        return ks[0] if ks else 128

    def _warn_if_uniform(self, diag: dict[str, float]) -> None:
        flagged = [k.split("/")[1] for k, v in diag.items() if k.endswith("near_uniform") and v > 0]
        if flagged and not getattr(self, "_warned_uniform", False):
            self._warned_uniform = True
            rank_zero_warn(f"the {', '.join(flagged)} distribution is near-uniform (entropy > 95% of log V): check that "
                           "the weights loaded (model.teacher.path, model.student.path) and the vocabularies match")

    def _accuracy(self, roll: Rollout) -> torch.Tensor:
        """Fraction of sampled responses that are correct: the on-policy 'reward' (logged, never optimised)."""
        ok = [self.task.is_correct(t, ex) for t, ex in zip(roll.texts, roll.examples)]
        return torch.tensor(sum(ok) / max(1, len(ok)))

    def _skip_nonfinite(self, loss):
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, batch_size=1)
        limit = self.optim_cfg.get("max_nonfinite_steps", 10)
        if self.nonfinite_steps > limit:
            raise FloatingPointError(
                f"loss was NaN/inf on {self.nonfinite_steps} steps (limit optim.max_nonfinite_steps={limit}); "
                "check the teacher weights and the learning rate")
        return None  # Lightning skips the optimiser step when training_step returns None

    def configure_optimizers(self):
        total = max(1, self.trainer.max_steps if self.trainer.max_steps > 0 else 1000)
        opt, sched = build_optimizer(self.student.parameters(), self.optim_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation: greedy decoding *without* p on held-out prompts ----------------------------------------------
    def on_train_start(self):
        # from_pretrained returns models in eval mode, and Lightning (>= 2.2) keeps each module's mode at fit: without
        # this the student would train in eval mode, with dropout and HF's gradient checkpointing (which only acts
        # in training mode) silently off. `train` keeps the teacher in eval mode.
        self.train()
        if self.eval_cfg.get("at_start", True) and self.global_step == 0:
            if self.eval_cfg.get("teacher_reference", True):
                self.evaluate(self.teacher, prefix="ref/teacher", routing=False)
            self.evaluate()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        every = self.eval_cfg.get("every", 0)
        step = self.global_step
        # With trainer.accumulate_grad_batches > 1 several batches end at the same optimizer step: evaluate once.
        if every and step % every == 0 and step < self.trainer.max_steps and step != self._evaluated_at:
            self.evaluate()

    def on_train_end(self):
        self.evaluate()

    @torch.no_grad()
    @torch.random.fork_rng()  # pass@k sampling must not shift the training RNG stream
    def evaluate(self, model=None, prefix: str = "eval", routing: bool = True) -> dict[str, float]:
        """`<prefix>/acc/<split>[/<domain>]` (greedy pass@1), `/avg` over splits, `pass<k>` (pass@k) if eval.pass_k > 1.

        The model (the student by default; the teacher once at the start, as the reference row of the tables)
        answers without p. Each rank scores its shard; torchmetrics reduces across ranks.
        """
        model = self.student if model is None else model
        if model is self.student:
            self._evaluated_at = self.global_step
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        kw = dict(max_new_tokens=self.rollout_cfg["max_new_tokens"], batch_size=self.eval_cfg.get("batch_size", 256),
                  engine=self.rollout_cfg.get("engine", "auto"))
        k = int(self.eval_cfg.get("pass_k", 0) or 0)
        results: dict[str, float] = {}
        for split, examples in dm.eval_examples.items():
            shard = examples[rank::world]
            values = {"acc": outcomes(model, self.view, self.task, shard, **kw)}
            if k > 1:
                values[f"pass{k}"] = outcomes(model, self.view, self.task, shard, k=k,
                                               temperature=self.rollout_cfg.get("temperature", 1.0), **kw)
            for name, (solved, lengths) in values.items():
                for domain, idx in domain_rows(shard).items():
                    results[f"{prefix}/{name}/{split}{domain}"] = _mean([solved[i] for i in idx], self.device)
            results[f"{prefix}/response_len/{split}"] = _mean(values["acc"][1], self.device)
        for name in ("acc", f"pass{k}") if k > 1 else ("acc",):
            per_split = [results[f"{prefix}/{name}/{split}"] for split in dm.eval_examples]
            if per_split:
                results[f"{prefix}/{name}/avg"] = sum(per_split) / len(per_split)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(results, step=self.global_step)
            if routing and self.eval_cfg.get("routing_samples", 0):
                self.log_routing(dm.eval_examples[next(iter(dm.eval_examples))][: self.eval_cfg["routing_samples"]])
        if model is self.student:
            self.last_eval = results
        return results

    @torch.no_grad()
    @torch.random.fork_rng()  # its sampling must not shift the training RNG stream (resume reproduces runs)
    def log_routing(self, examples) -> Path:
        """Fig. 9: sampled responses coloured by regime (HTML with hover details, and a PNG), as MLflow artifacts.

        All three reference passes are run here, whatever the router, so any run can be inspected this way.
        """
        roll = self.rollouts(examples, n=1)
        tokens, mask, rows = roll.tokens, roll.mask, roll.examples
        plain = self.view.contexts(rows, privileged=False, device=self.device)
        priv = self.view.contexts(rows, privileged=True, device=self.device)
        student_ctx = priv if self.router.student_context == "privileged" else plain
        logits = {"teacher": response_logits(self.teacher, plain, tokens, mask),
                  "teacher_priv": response_logits(self.teacher, priv, tokens, mask),
                  "student_priv": response_logits(self.student, priv, tokens, mask)}
        student_logits = response_logits(self.student, student_ctx, tokens, mask)
        out = routed_loss(self.router, student_logits, tokens, mask, **logits)
        gap = Gap.from_logits(logits["teacher_priv"], logits["student_priv"], tokens, self.router.temperature)
        regime = out.regime if self.router.routes else assign_regimes(gap, mask, self.router.gap)[0]
        texts = self.view.tok.batch_decode(tokens, skip_special_tokens=True)
        correct = [self.task.is_correct(t, ex) for t, ex in zip(texts, rows)]
        table = rows_from_batch([ex.question for ex in rows], token_strings(self.view.tok, tokens), regime,
                                gap.advantage, gap.log_q_student.exp(), gap.log_q_teacher.exp(), out.token_loss,
                                mask, correct)
        folder = Path(self.trainer.default_root_dir) / "routing"
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{self.router.name} step {self.global_step}: token regimes (LH yellow, LL grey, HT green, HS blue)"
        page = folder / f"routing_step{self.global_step:05d}.html"
        page.write_text(regime_html(table, title))
        regime_png(table, str(page.with_suffix(".png")), title)
        for logger in self.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                logger.experiment.log_artifact(logger.run_id, str(page), "routing")
                logger.experiment.log_artifact(logger.run_id, str(page.with_suffix(".png")), "routing")
        return page

    # -- checkpoints: the frozen teacher is reloaded from its source, not saved, unless asked ---------------------
    def on_save_checkpoint(self, checkpoint):
        if not self.checkpoint_teacher:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["dopd"] = {"router": asdict(self.router), "nonfinite_steps": self.nonfinite_steps,
                              "prune_generator": self.prune_generator.get_state(),
                              "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                      "numpy": _numpy_state_to_tensor(np.random.get_state())}}

    def on_load_checkpoint(self, checkpoint):
        extra = checkpoint.get("dopd", {})
        self.nonfinite_steps = extra.get("nonfinite_steps", 0)
        if "prune_generator" in extra:
            self.prune_generator.set_state(extra["prune_generator"])
        if "rng" in extra:  # sampling continues exactly where the interrupted run was
            torch.set_rng_state(extra["rng"]["torch"])
            random.setstate(extra["rng"]["python"])
            np.random.set_state(_numpy_state_from_tensor(extra["rng"]["numpy"]))
        missing = [k for k in self.state_dict() if k.startswith("student.") and k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} student weights (e.g. {missing[0]}); it was not written "
                           "by this model configuration")


def _numpy_state_to_tensor(state) -> dict:
    """numpy's RNG state as tensors and numbers, so checkpoints load with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_state_from_tensor(state: dict):
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


def _floats(metrics: dict) -> dict[str, float]:
    """Tensors and numbers as Python floats, with one device-to-host copy for all the tensors."""
    keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist() if keys else []
    return {k: float(v) for k, v in metrics.items() if not torch.is_tensor(v)} | dict(zip(keys, values))


def _mean(values, device) -> float:
    """Mean over all ranks (torchmetrics syncs when a process group exists)."""
    metric = MeanMetric().to(device)
    metric.update(torch.tensor([float(v) for v in values] or [float("nan")], device=device))
    return float(metric.compute())
