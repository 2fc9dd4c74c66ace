"""The SFT stage that builds the model zoo: teacher and student learn the task from reference solutions.

Each batch shows half its examples with the privileged hint and half without, so both models can read p
(the privileged passes of DOPD only make sense for models that learned what a hint means). The teacher/student
capability gap comes from size and training length, as with real model families.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dopd.evaluation import accuracy_table
from dopd.tasks.base import Example
from dopd.view import PrivilegedView, response_logits

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.0
    hint_prob: float = 0.5
    eval_every: int = 500
    eval_n: int = 256
    seed: int = 0


def sft(model, view: PrivilegedView, train: list[Example], cfg: SFTConfig, evals: dict[str, list[Example]] | None = None,
        task=None, on_eval=None) -> dict[str, float]:
    """Teacher-forced cross-entropy on reference solutions; returns the last evaluation."""
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    device = next(model.parameters()).device
    model.train()
    t0, last = time.time(), {}
    for step in range(1, cfg.steps + 1):
        batch = rng.sample(train, cfg.batch_size) if len(train) >= cfg.batch_size else rng.choices(train, k=cfg.batch_size)
        priv = [rng.random() < cfg.hint_prob for _ in batch]
        loss = 0.0
        for flag in (False, True):
            part = [ex for ex, p in zip(batch, priv) if p == flag]
            if not part:
                continue
            ctx = view.contexts(part, privileged=flag, device=device)
            ids, mask = view.response_ids([ex.solution for ex in part], device=device)
            logits = response_logits(model, ctx, ids, mask)
            ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
            loss = loss + (ce * mask).sum() / mask.sum() * len(part) / len(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if evals and task is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            last = {"loss": loss.item()}
            last.update(evaluate(model, view, task, evals, n=cfg.eval_n))
            log.info("sft step %d (%.0fs): %s", step, time.time() - t0, {k: round(v, 3) for k, v in last.items()})
            if on_eval:
                on_eval(step, last)
    return last


def evaluate(model, view, task, evals: dict[str, list[Example]], n: int = 256, max_new_tokens: int = 64,
             batch_size: int = 256) -> dict[str, float]:
    """Greedy accuracy per split (and domain), without p (`acc/<split>`) and with p (`acc_priv/<split>`)."""
    evals = {split: exs[:n] for split, exs in evals.items()}
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {**accuracy_table(model, view, task, evals, prefix="acc", **kw),
            **accuracy_table(model, view, task, evals, prefix="acc_priv", privileged=True, **kw)}
