"""Step-level rollouts: one optimizer step's rollouts in one generation call against one call per loss micro-batch,
through the harness's own `DistillModule.step_rollouts` on the zoo pair."""

from __future__ import annotations

import time

import torch

from . import ROOT
from .clocks import median, sync


def bench_step_rollouts(device, micro_batches: int = 16, rows: int = 8, reps: int = 3) -> dict:
    """Rollout time of one optimizer step of `micro_batches` x `rows` rows on the zoo pair (reason l -> s), through
    the harness's own step (`DistillModule.step_rollouts`): one generation call per loss micro-batch
    (rollout.batch_size=rows, how steps were sampled before step-level rollouts) against the whole step in one
    call (rollout.batch_size=null). The two alternate rep by rep, so machine noise hits both alike."""
    from omegaconf import OmegaConf

    from dopd.models import load_pair
    from dopd.module import DistillModule
    from dopd.pipeline import build_router, build_task, build_view, compose_config

    n = 4
    prompts = micro_batches * rows // n
    cfg = compose_config(["model=reason_l_s", "task=reason", f"data.batch_size={prompts}", f"rollout.n={n}"])
    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True), root=ROOT)
    pair.student.to(device)
    task = build_task(cfg.task)
    view = build_view(cfg, pair.tokenizer)
    batch = task.examples("train", prompts, 0)
    modules = {label: DistillModule(pair.student, pair.teacher, view, build_router(cfg.router), task,
                                    rollout={**OmegaConf.to_container(cfg.rollout, resolve=True), "batch_size": size},
                                    optim=dict(cfg.optim), eval=dict(cfg.eval))
               for label, size in (("per_micro_batch", rows), ("step", None))}
    times = {label: {"wall": [], "cpu": []} for label in modules}
    for rep in range(reps + 1):  # the first round warms up
        for label, module in modules.items():
            torch.manual_seed(rep)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            calls = module.step_rollouts(batch)
            sync(device)
            if rep:
                times[label]["wall"].append(time.perf_counter() - t0)
                times[label]["cpu"].append(time.process_time() - c0)
            times[label]["calls"] = len(calls)
    clock = "cpu" if torch.device(device).type == "cpu" else "wall"
    out = {"pair": "reason_l_s", "rows": micro_batches * rows, "micro_batches": micro_batches, "rows_per_micro_batch": rows,
           "max_new_tokens": int(cfg.rollout.max_new_tokens), "reps": reps, "clock": clock}
    for label, t in times.items():
        out[label] = {"calls": t["calls"], "ms_wall": min(t["wall"]) * 1e3, "ms_cpu": min(t["cpu"]) * 1e3,
                      "ms_wall_median": median(t["wall"]) * 1e3, "ms_cpu_median": median(t["cpu"]) * 1e3}
    out["step_rollout_speedup"] = out["per_micro_batch"][f"ms_{clock}"] / out["step"][f"ms_{clock}"]
    out["step_rollout_speedup_wall"] = out["per_micro_batch"]["ms_wall"] / out["step"]["ms_wall"]
    return out
