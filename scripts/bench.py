#!/usr/bin/env python
"""Performance benchmark of the distillation step: prints figures (it is not a timed test).

    python scripts/bench.py --quick --json /tmp/bench_quick.json   # small pair only, under 2 minutes on 2 CPU cores
    python scripts/bench.py --json bench.json                       # small pair + ~30M pair, ~10 minutes on CPU
    python scripts/bench.py --device cuda --dtype bf16 --pairs small,30m,gpu --json bench_gpu.json

What it measures, on fixed workloads (random-init Qwen3 pairs, fixed seeds, the same rollout settings for every
router of a pair):

* per router, one training step broken down into rollout, teacher forward (teacher|x and/or teacher|x,p),
  privileged-student forward, student forward+backward, routing+loss (forward and backward to the logits) and
  optimizer (clip + AdamW), by calling the pieces `DistillModule.training_step` calls (`dopd.rollout.sample`,
  `dopd.view.response_logits`, `dopd.routing.routed_loss`) with timers; generated tokens/s, trained tokens/s, peak
  memory. Routers run round-robin within each step, so machine noise hits them alike; one untimed step per
  router measures memory (on CPU that needs a heap trim, which would distort the timed steps);
* the full Lightning step (`DistillModule` under `lightning.Trainer`) for vanilla and DOPD;
* our vanilla OPD against TRL's `GKDTrainer` side by side (lmbda=1, beta=1 = reverse KL, same models, batch rows,
  generation length and sampling, fp32, no gradient checkpointing, the same AdamW and clipping);
* chunked full-vocabulary JS (`full_divergence(chunk_size=256)`) against the naive one-shot computation (the same
  math over all rows at once, no chunks, no checkpoint), each in a fresh subprocess for a clean peak RSS;
* the machine's dense matmul FLOP/s and the student's achieved forward+backward FLOP/s.

CPU timing on a shared machine is noisy: every time is recorded as wall clock and as process CPU time
(`time.process_time`, which a process waiting for a core does not accumulate). On CPU the ratios use CPU time;
on CUDA they use synchronised wall clock. Each figure is the best (minimum) of N repeated steps, the least-disturbed
estimate on a shared machine (as `timeit` recommends); medians are in the JSON too. Peak memory on CPU is peak RSS (Linux VmHWM, reset per measurement
through /proc/self/clear_refs); on CUDA `torch.cuda.max_memory_allocated`.

This file is the driver (the CLI, the plan of what runs, the run itself); each measurement lives in its own module
of `scripts/benchkit/` (workloads, clocks, routers, lightning_step, trl_gkd, loss, ablations, step_rollouts, report).
"""


from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# the benchkit package sits next to this file: importable however the driver is run (`python scripts/bench.py`, the
# loss worker's subprocess, or a test loading it by path)
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# light imports only at module level; the names tests and callers read off this module are re-exported here
from benchkit.ablations import bench_ablations  # noqa: E402
from benchkit.clocks import bench_train_flops, machine_info, matmul_peak, train_flops  # noqa: E402, F401
from benchkit.lightning_step import bench_lightning  # noqa: E402
from benchkit.loss import bench_loss, loss_worker  # noqa: E402
from benchkit.report import TARGETS, headline, print_report, _clean, write_json  # noqa: E402, F401
from benchkit.routers import SECTIONS, all_router_names, bench_routers, load_routers, router_entries  # noqa: E402, F401
from benchkit.step_rollouts import bench_step_rollouts  # noqa: E402
from benchkit.trl_gkd import bench_trl_gkd  # noqa: E402
from benchkit.workloads import PAIRS, IdView, PairSpec, _arch, build_workload, n_params  # noqa: E402, F401


def keep_best(store: dict, key: str, new: dict, clock: str) -> None:
    """Keep the faster of two rounds' results under store[key], with every round's step time listed."""
    old = store.get(key)
    rounds = (old or {}).get("rounds_ms", []) + [new[f"step_ms_{clock}"]]
    if old is None or new[f"step_ms_{clock}"] < old[f"step_ms_{clock}"]:
        store[key] = new
    store[key]["rounds_ms"] = rounds


@dataclass
class Plan:
    pairs: list[str]
    routers: dict[str, list[str]]  # pair -> router config names
    steps: int = 3  # timed steps per router (and per Lightning / TRL run); per-pair overrides in pair_steps
    warmup: int = 1
    pair_steps: dict[str, int] = field(default_factory=dict)
    lightning: dict[str, list[str]] = field(default_factory=dict)  # pair -> routers
    trl: list[str] = field(default_factory=list)  # pairs
    loss: dict = field(default_factory=dict)  # vocab, rows, chunk_size, small_rows
    matmul: tuple[int, int] = (2048, 5)
    ablations: list[str] = field(default_factory=list)
    ablation_reps: int = 3
    flops_probe: str | None = None  # a pair whose student forward+backward alone gives the FLOP-ratio target
    rounds: dict[str, int] = field(default_factory=dict)  # pair -> alternating Lightning / TRL rounds (default 1)
    step_rollouts: dict = field(default_factory=dict)  # micro_batches, rows, reps of bench_step_rollouts ({}: skip)


def make_plan(args) -> Plan:
    every = all_router_names()
    big = ["vanilla", "vanilla_full", "dopd"]
    if args.quick:
        plan = Plan(pairs=["small"], routers={"small": ["vanilla", "dopd", "teacher_priv", "opsd", "eopd", "tip"]},
                    steps=8, warmup=1, lightning={"small": ["vanilla"]}, trl=["small"],
                    loss={"vocab": 8192, "rows": 2048, "chunk_size": 256, "small_rows": 1024}, matmul=(2048, 3),
                    ablations=["small"], ablation_reps=2, rounds={"small": 3}, flops_probe="30m",
                    step_rollouts={"micro_batches": 16, "rows": 8, "reps": 3})
    elif args.tiny:
        plan = Plan(pairs=["tiny"], routers={"tiny": ["vanilla", "dopd"]}, steps=1, warmup=0,
                    lightning={"tiny": ["vanilla"]}, trl=["tiny"] if not args.no_trl else [],
                    loss={"vocab": 2048, "rows": 64, "chunk_size": 16, "small_rows": 32}, matmul=(256, 2),
                    ablations=["tiny"], ablation_reps=1, step_rollouts={"micro_batches": 2, "rows": 4, "reps": 1})
    else:
        pairs = args.pairs.split(",") if args.pairs else ["small", "30m"]
        routers = {p: (every if p in ("small", "tiny") else big) for p in pairs}
        # larger pairs: vanilla, DOPD and vanilla with a full-vocabulary reverse KL (TRL GKD's beta=1 objective)
        plan = Plan(pairs=pairs, routers=routers, steps=3, warmup=1, pair_steps={"small": 6},
                    lightning={p: ["vanilla", "dopd"] if PAIRS[p].vocab is None else ["vanilla_full"] for p in pairs},
                    trl=list(pairs), loss={"vocab": 151936, "rows": 2048, "chunk_size": 256, "small_rows": 512},
                    matmul=(2048, 5) if args.device == "cpu" else (8192, 10), ablations=list(pairs), ablation_reps=1,
                    rounds={p: 2 if PAIRS[p].vocab is None else 1 for p in pairs},
                    step_rollouts={"micro_batches": 16, "rows": 8, "reps": 5})
    if args.routers:
        plan.routers = {p: args.routers.split(",") for p in plan.pairs}
    if args.steps:
        plan.steps, plan.pair_steps = args.steps, {}
    if args.no_trl:
        plan.trl = []
    if args.no_lightning:
        plan.lightning = {}
    return plan


def run(args, router_loader=None, loss_runner=None) -> dict:
    """The whole benchmark; `router_loader(entries) -> {label: RouterSpec}` and `loss_runner` default to the config
    files (Hydra + build_router) and fresh subprocesses; tests substitute lighter ones."""
    router_loader = router_loader or load_routers
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    clock = "cpu" if torch.device(device).type == "cpu" else "wall"
    plan = make_plan(args)
    result = {"machine": machine_info(device), "mode": "quick" if args.quick else "tiny" if args.tiny else "full",
              "settings": {"device": device, "dtype": args.dtype, "threads": args.threads, "ratio_clock": clock,
                           "steps": plan.steps, "warmup": plan.warmup, "plan": asdict(plan)},
              "pairs": {}}
    say = (lambda *a: None) if args.silent else (lambda *a: print(*a, file=sys.stderr, flush=True))

    say(f"[bench] matmul peak ({plan.matmul[0]}^2)")
    result["matmul"] = matmul_peak(plan.matmul[0], device, dtype, plan.matmul[1])
    peak_key = f"gflop_s_{clock}"

    for pname in plan.pairs:
        spec = PAIRS[pname]
        steps = plan.pair_steps.get(pname, plan.steps)
        say(f"[bench] pair {pname}: building")
        w = build_workload(spec, device, steps + plan.warmup + 1)
        names = plan.routers[pname]
        specs = router_loader(router_entries(names))
        pr = {"steps": steps, "student_params": n_params(w.student), "teacher_params": n_params(w.teacher),
              "vocab": len(w.tokenizer), "rollout": {"prompts": spec.prompts, "n": spec.n, "rows": spec.prompts * spec.n,
                                                      "max_new_tokens": spec.max_new_tokens,
                                                      "temperature": spec.temperature},
              "student": spec.student, "teacher": spec.teacher}
        say(f"[bench] pair {pname}: {len(specs)} routers x {plan.warmup}+{steps} steps")
        pr["routers"] = bench_routers(w, specs, steps, plan.warmup, device, dtype, clock)
        van = pr["routers"].get("vanilla")
        if van and "dopd" in pr["routers"]:
            dopd_r = pr["routers"]["dopd"]
            pr["dopd_over_vanilla"] = dopd_r["step_ms"] / van["step_ms"]
            pr["dopd_over_vanilla_wall"] = dopd_r["step_ms_wall"] / van["step_ms_wall"]
            pr["dopd_over_vanilla_median"] = dopd_r[f"step_ms_{clock}_median"] / van[f"step_ms_{clock}_median"]
        if van:
            pr["train_flops_over_matmul_peak"] = van["student_train_gflop_s"] / result["matmul"][peak_key]
        # Lightning and TRL alternate in rounds (machine noise hits both alike); the best round counts.
        lspecs = router_loader(router_entries(plan.lightning[pname])) if plan.lightning.get(pname) else {}
        rounds = plan.rounds.get(pname, 1)
        for rnd in range(rounds if (lspecs or pname in plan.trl) else 0):
            for name, rspec in lspecs.items():
                say(f"[bench] pair {pname}: Lightning {name} (round {rnd + 1}/{rounds})")
                keep_best(pr.setdefault("lightning", {}), name,
                          bench_lightning(w, rspec, steps, plan.warmup, device, dtype), clock)
            if pname in plan.trl and "error" not in pr.get("trl_gkd", {}):
                say(f"[bench] pair {pname}: TRL GKDTrainer (round {rnd + 1}/{rounds})")
                try:
                    keep_best(pr, "trl_gkd", bench_trl_gkd(w, steps, plan.warmup, device, dtype), clock)
                except ImportError as err:
                    pr["trl_gkd"] = {"error": f"trl not installed ({err}); pip install trl==1.16.0"}
        for name, lt in pr.get("lightning", {}).items():
            if name in pr["routers"]:
                lt["overhead_over_loop"] = lt[f"step_ms_{clock}"] / pr["routers"][name]["step_ms"]
        trl = pr.get("trl_gkd")
        # ours: the Lightning step with exactly TRL's objective (full-vocabulary reverse KL); on the char vocabulary
        # (V=88 <= top_k=128) the default vanilla's top-K reverse KL already is the full one
        ours_key = "vanilla_full" if "vanilla_full" in pr.get("lightning", {}) else "vanilla"
        ours = pr.get("lightning", {}).get(ours_key)
        if trl and "error" not in trl and ours:
            pr["ours_vs_trl_router"] = ours_key
            pr["ours_over_trl_gkd"] = trl[f"step_ms_{clock}"] / ours[f"step_ms_{clock}"]
            pr["ours_over_trl_gkd_wall"] = trl["step_ms_wall"] / ours["step_ms_wall"]
            pr["ours_over_trl_gkd_median"] = trl[f"step_ms_{clock}_median"] / ours[f"step_ms_{clock}_median"]
            if ours_key in pr["routers"]:
                pr["loop_over_trl_gkd"] = trl[f"step_ms_{clock}"] / pr["routers"][ours_key]["step_ms"]
            for side in (trl, ours):
                side["steps_per_s"] = 1e3 / side[f"step_ms_{clock}"]
                side["trained_tok_s"] = side["trained_tokens"] * side["steps_per_s"]
            pr["ours_over_trl_gkd_tokens"] = ours["trained_tok_s"] / trl["trained_tok_s"]
        if pname in plan.ablations:
            say(f"[bench] pair {pname}: ablations")
            pr["ablations"] = bench_ablations(w, device, dtype, clock, plan.ablation_reps)
        result["pairs"][pname] = pr
        del w

    if plan.flops_probe:
        say(f"[bench] pair {plan.flops_probe}: student forward+backward alone (FLOP rate)")
        probe = bench_train_flops(PAIRS[plan.flops_probe], device, dtype)
        probe["over_matmul_peak"] = probe["gflop_s"] / result["matmul"][peak_key]
        result["flops_probe"] = probe

    if plan.loss:
        lcfg = plan.loss
        say(f"[bench] loss: chunked vs naive JS at V={lcfg['vocab']}, {lcfg['rows']} rows")
        result["loss"] = bench_loss(lcfg["vocab"], lcfg["rows"], lcfg["chunk_size"], device, args.threads,
                                    lcfg.get("small_rows"), runner=loss_runner)
        if lcfg["vocab"] != 151936 or lcfg["rows"] != 2048:
            result["loss"]["note"] = (f"reduced size V={lcfg['vocab']}, {lcfg['rows']} tokens ({result['mode']} mode); the full "
                                      "run uses V=151936, 2048 tokens")

    if plan.step_rollouts:
        sr = plan.step_rollouts
        say(f"[bench] step rollouts: {sr['micro_batches']} micro-batches x {sr['rows']} rows, per micro-batch vs one call")
        result["step_rollouts"] = bench_step_rollouts(device, **sr)

    headline(result, plan)
    result["runtime_s"] = time.perf_counter() - t_start
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small pair only, few steps, reduced loss size: < 2 min")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: a few seconds
    p.add_argument("--json", help="write all figures to this path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (bf16-mixed) forwards")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--pairs", help="comma-separated pairs for the full run: " + ",".join(PAIRS))
    p.add_argument("--routers", help="comma-separated router configs (default: all on small; vanilla, vanilla_full, dopd on larger pairs)")
    p.add_argument("--steps", type=int, help="timed steps per router (after one warm-up and one memory step)")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--no-lightning", action="store_true")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.add_argument("--_loss-worker", dest="loss_worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.loss_worker:
        print(json.dumps(loss_worker(json.loads(args.loss_worker))))
        return None
    result = _clean(run(args))
    print_report(result)
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
