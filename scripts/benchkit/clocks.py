"""Clocks and memory: wall-clock and process-CPU timers, peak memory (CUDA allocator or CPU peak RSS), the machine's
description, its dense matmul FLOP/s, and the student's forward+backward FLOP count and achieved rate."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import subprocess
import time
from collections import defaultdict

import torch

from .workloads import PairSpec


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Accumulates wall-clock and process-CPU seconds per named section (synchronising CUDA at both ends)."""

    def __init__(self, device):
        self.device = device
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, key: str):
        sync(self.device)
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            sync(self.device)
            self.wall[key] += time.perf_counter() - w
            self.cpu[key] += time.process_time() - c


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a region: CUDA max_memory_allocated, or on CPU peak RSS (VmHWM reset via clear_refs)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.base = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        self.base = _status("VmRSS") or 0

    def read(self) -> tuple[float, float]:
        """(peak MiB, peak minus the MiB in use at reset)."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status("VmHWM")
            if peak is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak / 2**20, (peak - self.base) / 2**20


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def mem_available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def machine_info(device) -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    import transformers

    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "device": str(device),
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "mem_available_gib_at_start": mem_available_mib() / 1024}
    with contextlib.suppress(Exception):
        import trl

        info["trl"] = trl.__version__
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def matmul_peak(n: int, device, dtype, reps: int) -> dict:
    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    walls, cpus = [], []
    for _ in range(reps):
        sync(device)
        w, c = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    flops = 2.0 * n**3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "gflop_s_wall": flops / min(walls) / 1e9,
            "gflop_s_cpu": flops / max(1e-9, min(cpus)) / 1e9}


def train_flops(model, rows: int, context: int, response: int, group: int = 1) -> float:
    """FLOPs of one forward+backward of `response_logits` on `rows` rows of `context` + `response` tokens.

    forward = 2*P_lin*tokens + attention + 2*V*d*rows*(response + 1), backward = 2x forward (P_lin: the decoder's
    linear weights; norms, rotary, softmax and the embedding lookup not counted; the lm_head only at the response
    positions). With `group` = 1, one pass over [rows, context + response]: attention counted over the full masked
    square, as SDPA computes it. With `group` > 1 (rows in runs sharing a context, `response_logits(group=...)`),
    each context runs once ([rows/group, context], its square) and the responses attend to context + response.
    """
    cfg = model.config
    lin = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    per_token_attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # per query-key pair
    if group <= 1:
        seq = context + response
        tokens, attn = rows * seq, per_token_attn * seq * seq * rows
    else:
        tokens = rows // group * context + rows * response
        attn = per_token_attn * (rows // group * context * context + rows * response * (context + response))
    head = 2 * cfg.vocab_size * cfg.hidden_size * rows * (response + 1)
    return 3.0 * (2 * lin * tokens + attn + head)


def bench_train_flops(spec: PairSpec, device, dtype, reps: int = 3) -> dict:
    """The student's forward+backward alone (`response_logits` then backward), on the pair's rollout shape with random
    ids: what the steps' "S fwd+bwd" measures, without building the teacher or sampling. `--quick` uses it on the
    30M pair, which the issue's FLOP target names, while its step figures come from the small pair."""
    from dopd.models import tiny_qwen3
    from dopd.view import Contexts, response_logits

    student = tiny_qwen3(spec.vocab, seed=0, **spec.student).to(device).train()
    g = torch.Generator().manual_seed(0)
    rows, context = spec.prompts * spec.n, sum(spec.context) // 2
    ctx = Contexts(torch.randint(4, spec.vocab, (rows, context), generator=g).to(device),
                   torch.ones(rows, context, dtype=torch.long, device=device))
    tokens = torch.randint(4, spec.vocab, (rows, spec.max_new_tokens), generator=g).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        c = Clock(device)
        with c("x"), autocast(device, dtype):
            response_logits(student, ctx, tokens, mask).float().logsumexp(-1).mean().backward()
        student.zero_grad(set_to_none=True)
        times.append(c.cpu["x"] if torch.device(device).type == "cpu" else c.wall["x"])
    flops = train_flops(student, rows, context, spec.max_new_tokens)
    best = min(times[1:])
    return {"pair": spec.name, "rows": rows, "seq_len": context + spec.max_new_tokens, "gflop": flops / 1e9,
            "best_s": best, "gflop_s": flops / 1e9 / best}
