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
from dopd.optim import build_optimizer
from dopd.rollout import Rollout, cat_rollouts, sample
from dopd.settings import complete
from dopd.routing import Gap, RouterSpec, Selection, assign_regimes, routed_loss, select_tokens, token_scores
from dopd.view import Contexts, PrivilegedView, response_logits
from dopd.visualize import routing_page


class ContextCache:
    """The contexts a rollout's passes read, each built once: x, and x with p. Where (x, p) is x token for token
    (an empty p: the control) the two are one object, so the privileged passes are the plain ones."""

    def __init__(self, view: PrivilegedView, roll: Rollout, student_context: str, device=None):
        self.view, self.roll, self.device = view, roll, device
        self.built = {("privileged" if student_context == "privileged" else "plain"): roll.context}

    def __call__(self, name: str) -> Contexts:
        if name not in self.built:
            made = self.view.contexts(self.roll.examples, privileged=name == "privileged", device=self.device)
            other = self.built.get("plain" if name == "privileged" else "privileged")
            self.built[name] = other if other is not None and made.equals(other) else made
        return self.built[name]


def forward_passes(student, teacher, view: PrivilegedView, router: RouterSpec, roll: Rollout, device=None,
                   section=None, targets: dict[str, torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student logits (with grad) and the no-grad target logits the router asks for, all aligned to `roll.tokens`.

    `targets` already computed for this rollout (the step's statistics pass kept them) are used as they are.
    Where the privileged student reads the trained student's own context (the control, or a privileged student),
    its target is the trained pass's logits, detached: bit for bit the student. `section(name)`, a context manager
    entered around the "student", "teacher" and "student_priv" passes, is how `scripts/bench.py` times this very
    code; none by default.
    """
    section = section or (lambda name: contextlib.nullcontext())
    context = ContextCache(view, roll, router.student_context, device)
    with section("student"):
        student_logits = response_logits(student, context(router.student_context), roll.tokens, roll.mask,
                                         shared_context_group(student, roll))
    own = "student_priv" in router.passes and context("privileged") is context(router.student_context)
    if targets is None:
        targets = target_passes(student, teacher, router.passes - ({"student_priv"} if own else set()), roll, context, section)
    if own:
        targets = {**targets, "student_priv": student_logits.detach()}
    return student_logits, targets


@torch.no_grad()
def target_passes(student, teacher, need: set[str], roll: Rollout, context: ContextCache,
                  section=None) -> dict[str, torch.Tensor]:
    """The no-grad passes in `need` (of TARGETS) over one rollout: teacher|x, teacher|x,p, student|x,p (logits)."""
    section = section or (lambda name: contextlib.nullcontext())
    tokens, mask, out = roll.tokens, roll.mask, {}
    with section("teacher"):
        if "teacher" in need:
            out["teacher"] = response_logits(teacher, context("plain"), tokens, mask, roll.n)
        if "teacher_priv" in need:
            same = "teacher" in out and context("privileged") is context("plain")
            out["teacher_priv"] = out["teacher"] if same else response_logits(teacher, context("privileged"), tokens,
                                                                               mask, roll.n)
    with section("student_priv"):
        if "student_priv" in need:
            out["student_priv"] = response_logits(student, context("privileged"), tokens, mask, roll.n)
    return out


def shared_context_group(model, roll: Rollout) -> int:
    """How many rollouts share one context pass in the trained student pass: the prompt's n, unless gradient
    checkpointing is on (it turns the KV cache that the shared pass hands on off)."""
    # transformers 5 names the flag is_activation_checkpointing (is_gradient_checkpointing is deprecated); 4.x the latter
    on = getattr(model, "is_activation_checkpointing", None)
    on = getattr(model, "is_gradient_checkpointing", False) if on is None else on
    return 1 if on else roll.n


class DistillModule(L.LightningModule):
    def __init__(self, student, teacher, view: PrivilegedView, router: RouterSpec, task, *, rollout: dict,
                 optim: dict, eval: dict, checkpoint_teacher: bool = False, gradient_clip_val: float | None = None):
        super().__init__()
        self.student, self.teacher, self.view, self.router, self.task = student, teacher, view, router, task
        # The YAML's defaults for whatever the caller left out (scripts and tests pass a few keys), every value checked
        self.rollout_cfg, self.optim_cfg = complete("rollout", rollout), complete("optim", optim)
        self.eval_cfg = complete("eval", eval)
        self.checkpoint_teacher = checkpoint_teacher
        self.teacher.eval().requires_grad_(False)
        self.strict_loading = False  # the teacher is not in checkpoints unless asked for
        self.prune_generator = torch.Generator()
        self.nonfinite_steps = 0
        self.automatic_optimization = False  # one step = the step's rollouts over its micro-batches (training_step)
        self.gradient_clip_val = gradient_clip_val
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
                      top_k=r["top_k"], engine=r["engine"])

    def forward_passes(self, roll: Rollout, targets: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return forward_passes(self.student, self.teacher, self.view, self.router, roll, self.device, targets=targets)

    def training_step(self, batch, batch_idx):
        """One optimizer step (Eq. 11 over all of its rollouts), whatever its cut into calls and micro-batches:

        1. every rollout of the step is sampled from the same weights, `rollout.batch_size` rows per call;
        2. the rows are cut into loss micro-batches of `optim.micro_batch_size`;
        3. with `router.gap.scope=step`, the router's selection (DOPD's bars, EOPD/TIP's, pruning) is made once over
           the step's tokens on every process (`step_selection`), then each micro-batch's loss uses its share;
        4. each micro-batch's loss is its sequences' share of the step's mean and is backpropagated at once, so the
           summed gradient is the whole step's; then one clipped optimizer step, and the evaluation it is due.
        """
        opt, sched = self.optimizers(), self.lr_schedulers()
        parts = self.micro_batches(self.step_rollouts(batch))
        opt.zero_grad()
        loss, merged = self.step_gradient(parts)
        if not torch.isfinite(loss):  # on every process alike: the step is skipped everywhere
            opt.zero_grad()
            return self._skip_nonfinite(loss)
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        roll = cat_rollouts(parts, self.view.tok.pad_token_id)
        metrics = {"train/loss": loss, "train/response_len": roll.lengths.float().mean(),
                   "train/eos_rate": (roll.tokens == self.view.tok.eos_token_id).any(-1).float().mean(),
                   "train/reward": self._accuracy(roll)}
        metrics.update({f"train/{k}": v for k, v in merged.items()})
        self._warn_if_uniform(merged)
        self.step_metrics = _floats(metrics)
        self._log_step(self.step_metrics, self.global_step - 1)  # at the step's index (0 for the first update)
        self.log("loss", loss, prog_bar=True, on_step=True, batch_size=len(batch), logger=False)
        self.evaluate_if_due()

    def step_gradient(self, parts: list[Rollout]) -> tuple[torch.Tensor, dict[str, float]]:
        """Accumulate the step's gradient over its micro-batches into the student's .grad; returns the step's loss
        (summed over processes) and its figures. Each micro-batch is backpropagated as soon as its loss is known,
        so one micro-batch's passes are in memory at a time."""
        selections, kept = self.step_selection(parts)
        world = self._world_size
        n_seq = int(self._sum_over_ranks(sum(int((p.lengths > 0).sum()) for p in parts)))
        loss, logs = torch.zeros((), device=self.device), []
        for part, selection, targets in zip(parts, selections, kept):
            student_logits, targets = self.forward_passes(part, targets)
            out = routed_loss(self.router, student_logits, part.tokens, part.mask, generator=self.prune_generator,
                              selection=selection, n_sequences=max(1, n_seq), **targets)
            scaled = out.loss * world  # DDP averages over processes; the loss is already the step's share
            if self._trainer is not None:
                self.manual_backward(scaled)
            else:  # outside a Trainer (tests, scripts): the same gradient
                scaled.backward()
            loss = loss + out.loss.detach()
            with torch.no_grad():
                entropy, diag = step_diagnostics(student_logits, targets, part.mask, self.diag_top_k)
            logs.append((int(part.mask.sum()), {"entropy": entropy, **out.stats, **diag}))
            del student_logits, targets, out
        return self._sum_over_ranks(loss), _token_weighted(logs, selections[0])

    def step_rollouts(self, batch) -> list[Rollout]:
        """All of the step's rollouts on this process, from the same weights, in calls of `rollout.batch_size` rows
        (null: one call for all of them)."""
        n = self.rollout_cfg["n"]
        per_call = max(1, (self.rollout_cfg["batch_size"] or len(batch) * n) // n)  # prompts per call
        return [self.rollouts(batch[i : i + per_call]) for i in range(0, len(batch), per_call)]

    def micro_batches(self, calls: list[Rollout]) -> list[Rollout]:
        """The step's rows cut into loss micro-batches of `optim.micro_batch_size` rows (null: one), each with its
        own context; a call that is exactly one micro-batch is used as it is."""
        total = sum(c.tokens.shape[0] for c in calls)
        rows = self.optim_cfg["micro_batch_size"] or total
        if all(c.tokens.shape[0] == rows for c in calls):
            return calls
        step = cat_rollouts(calls, self.view.tok.pad_token_id)
        privileged = self.router.student_context == "privileged"
        return [step.rows(i, min(i + rows, total), self.view, privileged) for i in range(0, total, rows)]

    @torch.no_grad()
    def step_selection(self, parts: list[Rollout]) -> tuple[list, list]:
        """With `router.gap.scope=step`: the router's selection over every response token of the step, on every
        process, cut back into each micro-batch's share; and the target logits this pass computed, for the loss
        to reuse (`optim.keep_targets`; else the loss recomputes them, one micro-batch's at a time in memory).
        Nothing to do (None for each part) when the router selects nothing or the step is one batch already."""
        none = [None] * len(parts)
        spec = self.router
        world = self._world_size
        if not spec.selects or spec.gap.scope == "micro_batch" or (len(parts) == 1 and world == 1):
            return none, none
        scores, kept, counts = [], [], []
        for part in parts:
            context = ContextCache(self.view, part, spec.student_context, self.device)
            targets = target_passes(self.student, self.teacher, spec.passes, part, context)
            student = (response_logits(self.student, context(spec.student_context), part.tokens, part.mask, part.n)
                       if spec.grouping == "tip" else None)
            tokens = part.tokens.masked_fill(~part.mask, 0)
            scores.append({k: v[part.mask] for k, v in token_scores(spec, tokens, student, targets).items()})
            counts.append(int(part.mask.sum()))
            kept.append(targets if self.optim_cfg["keep_targets"] else None)
        flat = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
        offset, total = _rank_offset(sum(counts), world)
        flat = {k: _gather_cat(v) for k, v in flat.items()}
        selection = select_tokens(spec, flat, total, self.prune_generator)
        mine = slice(offset, offset + sum(counts))
        return Selection(selection.group[mine], selection.regime[mine], selection.stats).split(counts), kept

    @property
    def _world_size(self) -> int:
        """Processes of the step (1 outside a Trainer: tests and scripts call the step's pieces directly)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def _sum_over_ranks(self, value) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        if self._world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def _log_step(self, metrics: dict[str, float], step: int) -> None:
        """This rank's step metrics straight to the loggers (rank zero, every trainer.log_every_n_steps), as
        Lightning's on-step logging does: `self.log` costs ~2 ms per key, a tenth of a small CPU step at 20 keys."""
        every = max(1, int(self.trainer.log_every_n_steps or 1))
        if self.trainer.is_global_zero and (step + 1) % every == 0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

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
        limit = self.optim_cfg["max_nonfinite_steps"]
        if self.nonfinite_steps > limit:
            raise FloatingPointError(
                f"loss was NaN/inf on {self.nonfinite_steps} steps (limit optim.max_nonfinite_steps={limit}); "
                "check the teacher weights and the learning rate")
        return None  # no optimizer step: trainer.global_step stays, the next batch tries again

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
        if self.eval_cfg["at_start"] and self.global_step == 0:
            if self.eval_cfg["teacher_reference"]:
                self.evaluate(self.teacher, prefix="ref/teacher", routing=False)
            self.evaluate()

    def evaluate_if_due(self):
        """After an optimizer step: every `eval.every` steps and at `trainer.max_steps`. Inside the step, so before
        the checkpoint of the same step is written: a crash during it redoes it on resume, never loses it."""
        every, step = self.eval_cfg["every"], self.global_step
        if (every and step % every == 0) or step == self.trainer.max_steps:
            self.evaluate()

    def on_train_end(self):
        if self._evaluated_at != self.global_step:  # training ended other than at max_steps
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
        kw = dict(max_new_tokens=self.rollout_cfg["max_new_tokens"], batch_size=self.eval_cfg["batch_size"],
                  engine=self.rollout_cfg["engine"])
        k = int(self.eval_cfg["pass_k"] or 0)
        results: dict[str, float] = {}
        for split, examples in dm.eval_examples.items():
            shard = examples[rank::world]
            values = {"acc": outcomes(model, self.view, self.task, shard, **kw)}
            if k > 1:
                values[f"pass{k}"] = outcomes(model, self.view, self.task, shard, k=k,
                                               temperature=self.rollout_cfg["temperature"], **kw)
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
            if routing and self.eval_cfg["routing_samples"]:
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
        page = routing_page(Path(self.trainer.default_root_dir) / "routing", self.router.name, self.global_step,
                            [ex.question for ex in rows], self.view.tok, tokens, regime, gap.advantage,
                            gap.log_q_student.exp(), gap.log_q_teacher.exp(), out.token_loss, mask, correct)
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
                              "last_eval": getattr(self, "last_eval", {}),
                              "prune_generator": self.prune_generator.get_state(),
                              "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                      "numpy": _numpy_state_to_tensor(np.random.get_state())}}

    def on_load_checkpoint(self, checkpoint):
        extra = checkpoint.get("dopd", {})
        self.nonfinite_steps = extra.get("nonfinite_steps", 0)
        if extra.get("last_eval"):  # a run resumed at its end still returns its final evaluation
            self.last_eval = extra["last_eval"]
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


def _token_weighted(logs: list[tuple[int, dict]], selection: Selection | None = None) -> dict[str, float]:
    """The step's figures from its micro-batches': each weighted by its response tokens (exact for fractions and
    means over all tokens; a mean over a regime's tokens or a quantile is approximate). The bars of a step-wide
    selection are the same in every micro-batch and stay as they are."""
    total = sum(n for n, _ in logs) or 1
    keys = dict.fromkeys(k for _, stats in logs for k in stats)
    return {k: sum(n * float(stats[k]) for n, stats in logs if k in stats) / total
            if selection is None or k not in selection.stats else selection.stats[k] for k in keys}


def _rank_offset(n: int, world: int) -> tuple[int, int]:
    """Where this process's n tokens start among every process's, and how many there are in all."""
    if world == 1 or not torch.distributed.is_initialized():
        return 0, n
    sizes = [None] * world
    torch.distributed.all_gather_object(sizes, n)
    rank = torch.distributed.get_rank()
    return sum(sizes[:rank]), sum(sizes)


def _gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D tensor, concatenated in rank order (lengths may differ)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return x
    world = torch.distributed.get_world_size()
    sizes = [None] * world
    torch.distributed.all_gather_object(sizes, x.numel())
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])
