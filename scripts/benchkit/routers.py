"""Per router, one training step piece by piece: rollout, teacher forward, privileged-student forward, student
forward+backward, routing+loss and optimizer, each under its own timer; routers run round-robin within each step."""

from __future__ import annotations

import copy
from collections import defaultdict

import torch

from . import ROOT
from .clocks import Clock, PeakMemory, autocast, median, train_flops
from .workloads import Workload


def all_router_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "router").glob("*.yaml"))


def load_routers(entries: list[tuple[str, list[str]]]):
    """{label: RouterSpec} from conf/router through Hydra and dopd.pipeline.build_router, with extra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dopd.pipeline import build_router

    GlobalHydra.instance().clear()
    out = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for label, overrides in entries:
            out[label] = build_router(compose("train", overrides=overrides).router)
    GlobalHydra.instance().clear()
    return out


def router_entries(names: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for n in names:
        if n == "vanilla_full":  # vanilla with a full-vocabulary reverse KL: exactly TRL GKD's beta=1 objective
            out.append((n, ["router=vanilla", "router.rules.all.scope=full"]))
        else:
            out.append((n, [f"router={n}"]))
    return out


SECTIONS = ("rollout", "teacher_fwd", "priv_student_fwd", "student_fwd_bwd", "routing_loss", "optimizer")


def bench_step(w: Workload, spec, student, opt, device, dtype=None, generator=None, memory: bool = False,
               step: int = 0) -> dict:
    """One training step of DistillModule's pieces (its rollout, `forward_passes`, `routed_loss`, AdamW with
    clipping) with a timer around each; what Lightning adds around them is timed in `bench_lightning`.

    The backward is split in two with the same result as one `loss.backward()`: the loss is differentiated into a
    detached copy of the student logits (counted in routing_loss), then that gradient is pushed through the student
    (counted in student_fwd_bwd). With `memory`, the step's peak memory is measured too: on CPU that trims the
    heap first (so the next allocations page-fault), which is why timed steps never measure memory.
    """
    from dopd.module import forward_passes, shared_context_group
    from dopd.rollout import sample
    from dopd.routing import routed_loss

    clock, mem, s = Clock(device), PeakMemory(device), w.spec
    if memory:
        mem.reset()
    with clock("rollout"), autocast(device, dtype):
        roll = sample(student, w.view, w.batch(step), n=s.n, privileged=spec.student_context == "privileged",
                      max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0)
    tokens, mask = roll.tokens, roll.mask
    sections = {"student": "student_fwd_bwd", "teacher": "teacher_fwd", "student_priv": "priv_student_fwd"}
    with autocast(device, dtype):  # the module's own passes, each inside its timer
        student_logits, targets = forward_passes(student, w.teacher, w.view, spec, roll, device,
                                                 section=lambda name: clock(sections[name]))
    leaf = student_logits.detach().requires_grad_()
    with clock("routing_loss"):
        out = routed_loss(spec, leaf, tokens, mask, generator=generator, **targets)
        out.loss.backward()
    with clock("student_fwd_bwd"):
        student_logits.backward(leaf.grad)
    with clock("optimizer"):
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak, delta = mem.read() if memory else (float("nan"), float("nan"))
    seq = roll.context.input_ids.shape[1] + tokens.shape[1]  # the student's context: x, or x with p
    return {"wall": dict(clock.wall), "cpu": dict(clock.cpu), "generated": int(mask.sum()), "trained": int(mask.sum()),
            "rows": int(tokens.shape[0]), "response_width": int(tokens.shape[1]), "seq_len": int(seq),
            "student_flops": train_flops(student, tokens.shape[0], roll.context.input_ids.shape[1], tokens.shape[1],
                                         shared_context_group(student, roll)),
            "peak_mib": peak, "peak_delta_mib": delta, "loss": float(out.loss.detach())}


def summarise(records: list[dict], clock: str) -> dict:
    """Best (min) and median over measured steps of each section and of the step; `clock` (cpu | wall) and the
    best-of statistic are what the headline figures use: on a shared machine the fastest of N repeats is the
    least-disturbed estimate of the code's own cost (as `timeit` recommends), the median shows the typical one."""
    out = {}
    for kind in ("wall", "cpu"):
        for stat, f in (("", min), ("_median", median)):
            out[f"breakdown_ms_{kind}{stat}"] = {k: f([r[kind].get(k, 0.0) for r in records]) * 1e3 for k in SECTIONS}
            out[f"step_ms_{kind}{stat}"] = f([sum(r[kind].values()) for r in records]) * 1e3
    step_s = out[f"step_ms_{clock}"] / 1e3
    out["step_ms"] = out[f"step_ms_{clock}"]
    out["breakdown_ms"] = out[f"breakdown_ms_{clock}"]
    out["generated_tokens"] = median([r["generated"] for r in records])
    out["trained_tokens"] = median([r["trained"] for r in records])
    out["gen_tok_s"] = out["generated_tokens"] / max(1e-9, out["breakdown_ms"]["rollout"] / 1e3)
    out["trained_tok_s"] = out["trained_tokens"] / max(1e-9, step_s)
    fb = min(r[clock]["student_fwd_bwd"] for r in records)
    out["student_train_gflops"] = median([r["student_flops"] for r in records]) / 1e9
    out["student_train_gflop_s"] = out["student_train_gflops"] / max(1e-9, fb)
    out["rows"], out["seq_len"] = records[-1]["rows"], records[-1]["seq_len"]
    out["final_loss"] = records[-1]["loss"]
    return out


def bench_routers(w: Workload, specs: dict, steps: int, warmup: int, device, dtype, clock: str) -> dict:
    """Round-robin over routers within each step; each router trains its own copy of the same initial student.

    Rounds: `warmup` untimed steps, one untimed step that measures peak memory, then `steps` timed steps.
    """
    states = {}
    for name in specs:
        student = copy.deepcopy(w.student).train()
        states[name] = (student, torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=0.0),
                        torch.Generator().manual_seed(0))
    records, memory = defaultdict(list), {}
    for step in range(warmup + 1 + steps):
        for name, spec in specs.items():
            student, opt, gen = states[name]
            torch.manual_seed(1000 + step)  # the same prompts and sampling seed for every router
            rec = bench_step(w, spec, student, opt, device, dtype, gen, memory=step == warmup, step=step)
            if step == warmup:
                memory[name] = rec
            elif step > warmup:
                records[name].append(rec)
    del states
    out = {}
    for name, recs in records.items():
        out[name] = summarise(recs, clock)
        out[name]["peak_mib"] = memory[name]["peak_mib"]
        out[name]["step_peak_delta_mib"] = memory[name]["peak_delta_mib"]
    return out
