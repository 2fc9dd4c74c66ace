"""Chunked full-vocabulary JS (`full_divergence(chunk_size=...)`) against the naive one-shot computation, each in a
fresh subprocess for a clean peak RSS: the subprocess runs the driver, `scripts/bench.py --_loss-worker CFG`, which
calls `loss_worker` and prints its result as the last line of stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from dopd.divergences import full_divergence, full_divergence_unchunked

from . import DRIVER, ROOT
from .clocks import Clock, PeakMemory, mem_available_mib


def loss_worker(cfg: dict) -> dict:
    """In a fresh process: forward+backward of per-row JS(beta=0.5) on [N, V] fp32 logits, naive or chunked.

    naive: the same math as one chunk of `full_divergence`, over all rows at once (no chunks, no checkpoint);
    chunked: `full_divergence(..., chunk_size)`. Peak memory is measured above the inputs (student and target
    logits already allocated); the student gradient ([N, V]) is part of both peaks.
    """
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    # Warm-up (lazy imports and first-call setup of checkpoint/autograd) before any measurement.
    w = torch.randn(8, 64, device=device, requires_grad=True)
    full_divergence(w, torch.randn(8, 64, device=device), "js", 0.5, 1.0, chunk_size=4).sum().backward()
    full_divergence_unchunked(w, torch.randn(8, 64, device=device), "js", 0.5, 1.0).sum().backward()
    del w
    results = []
    for n in cfg["rows"]:
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(n, cfg["vocab"], generator=g) * 3).to(device).requires_grad_()
        t = (torch.randn(n, cfg["vocab"], generator=g) * 3).to(device)
        mem, clock = PeakMemory(device), Clock(device)
        mem.reset()
        with clock("fwd"):
            if cfg["variant"] == "naive":
                values = full_divergence_unchunked(s, t, "js", 0.5, 1.0)
            else:
                values = full_divergence(s, t, "js", 0.5, 1.0, chunk_size=cfg["chunk_size"])
        with clock("bwd"):
            values.sum().backward()
        peak, delta = mem.read()
        probe = sorted({0, n // 2, n - 1})
        # The probed rows' gradient in fp64 (after the measurement): each variant's fp32 error is judged against it,
        # since two fp32 computations in different orders differ by their own rounding.
        ref = s.detach()[probe].double().requires_grad_()
        full_divergence_unchunked(ref, t[probe].double(), "js", 0.5, 1.0).sum().backward()
        err = (s.grad[probe].double() - ref.grad).abs().amax(-1) / ref.grad.abs().amax(-1)
        results.append({"rows": n, "peak_mib": peak, "peak_delta_mib": delta, "wall_s": sum(clock.wall.values()),
                        "cpu_s": sum(clock.cpu.values()), "fwd_wall_s": clock.wall["fwd"], "bwd_wall_s": clock.wall["bwd"],
                        "values": values.detach().cpu().tolist(), "grad_rows": s.grad[probe].cpu().tolist(),
                        "probe": probe, "grad_rel_err_fp64": float(err.max())})
        del s, t, values
    return {"variant": cfg["variant"], "results": results}


def _run_worker(cfg: dict) -> dict:
    # glibc: every allocation over 1 MiB gets its own mapping, returned on free, so peak RSS follows live tensors
    # (by default, blocks under the dynamic mmap threshold, up to 32 MiB, stay in the heap after being freed).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, str(DRIVER), "--_loss-worker", json.dumps(cfg)], capture_output=True,
                          text=True, cwd=str(ROOT), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"loss worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_loss(vocab: int, rows: int, chunk_size: int, device, threads: int, small_rows: int | None = None,
               runner=None) -> dict:
    """Chunked vs naive at [rows, vocab]; the naive side runs at `rows` only if it fits in memory, else it is
    measured at two smaller sizes and extrapolated linearly (its memory is linear in rows: every [rows, V] fp32
    intermediate scales with rows), which the output says."""
    base = {"vocab": vocab, "chunk_size": chunk_size, "device": device, "threads": threads}
    probe_rows = small_rows or max(64, rows // 4)
    # Per-row naive memory: ~14 live [*, V] fp32 intermediates (measured 8.1 MiB/row at V=151936 on CPU).
    predicted = 14.5 * 4 * vocab * rows / 2**20
    cuda = torch.device(device).type == "cuda"
    free = torch.cuda.mem_get_info()[0] / 2**20 if cuda else mem_available_mib()
    naive_full = predicted <= 0.35 * free
    naive_rows = [rows] if naive_full else sorted({probe_rows // 2, probe_rows})
    chunk_rows = sorted({probe_rows, rows}) if not naive_full else [rows]
    runner = runner or _run_worker  # tests pass loss_worker itself (in-process: values right, peaks less clean)
    naive = runner({**base, "variant": "naive", "rows": naive_rows})["results"]
    chunked = runner({**base, "variant": "chunked", "rows": chunk_rows})["results"]
    n_at = {r["rows"]: r for r in naive}
    c_at = {r["rows"]: r for r in chunked}
    common = max(set(n_at) & set(c_at))
    a, b = n_at[common], c_at[common]
    # Equal results: the same values, and both gradients as close to fp64 as fp32 allows (max error per probed row
    # under 1e-3 of the row's largest entry; both measure ~2-3e-4 at V=151936, the chunked one slightly lower).
    equal = True
    try:
        torch.testing.assert_close(torch.tensor(b["values"]), torch.tensor(a["values"]), rtol=1e-5, atol=1e-6)
    except AssertionError:
        equal = False
    equal = equal and max(a["grad_rel_err_fp64"], b["grad_rel_err_fp64"]) < 1e-3
    max_diff = max(abs(x - y) for x, y in zip(a["values"], b["values"]))
    if naive_full:
        naive_peak, naive_note = n_at[rows]["peak_delta_mib"], "measured"
    else:  # linear fit through the two measured sizes
        (r1, m1), (r2, m2) = sorted((r["rows"], r["peak_delta_mib"]) for r in naive)
        slope = (m2 - m1) / (r2 - r1)
        naive_peak = m2 + slope * (rows - r2)
        naive_note = (f"extrapolated linearly from measured {r1} and {r2} rows ({m1:.0f} and {m2:.0f} MiB); "
                      f"the measured run at {rows} rows needs ~{predicted / 1024:.1f} GiB, more than 35% of the "
                      f"{free / 1024:.1f} GiB available")
    clock_key = "wall_s" if cuda else "cpu_s"
    out = {
        "vocab": vocab, "rows": rows, "chunk_size": chunk_size, "equal_results": equal,
        "max_abs_value_diff": max_diff, "compared_at_rows": common,
        "grad_rel_err_fp64": {"naive": a["grad_rel_err_fp64"], "chunked": b["grad_rel_err_fp64"]},
        "naive_peak_delta_mib": naive_peak, "naive_peak_note": naive_note,
        "chunked_peak_delta_mib": c_at[rows]["peak_delta_mib"],
        "time_compared_at_rows": common,
        "naive_s_wall": a["wall_s"], "chunked_s_wall": b["wall_s"], "naive_s_cpu": a["cpu_s"], "chunked_s_cpu": b["cpu_s"],
        "naive_measured": [{k: r[k] for k in ("rows", "peak_delta_mib", "wall_s", "cpu_s")} for r in naive],
        "chunked_measured": [{k: r[k] for k in ("rows", "peak_delta_mib", "wall_s", "cpu_s")} for r in chunked],
        "input_mib_per_tensor": rows * vocab * 4 / 2**20,
    }
    out["chunked_over_naive_peak_mem"] = out["chunked_peak_delta_mib"] / naive_peak
    out["chunked_over_naive_peak_mem_at_compared_rows"] = b["peak_delta_mib"] / a["peak_delta_mib"]
    out["chunked_over_naive_time"] = b[clock_key] / a[clock_key]
    out["chunked_over_naive_time_wall"] = b["wall_s"] / a["wall_s"]
    return out
