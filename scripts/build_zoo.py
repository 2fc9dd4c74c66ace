"""Build the default teacher/student pair (`zoo/arith`) by SFT of random-init Qwen3 models on the arith task.

    python scripts/build_zoo.py                    # both models, one after the other, 1 thread
    python scripts/build_zoo.py --parallel         # both at once, one process (1 thread) each
    python scripts/build_zoo.py --only student     # rebuild one model; the other's entry in card.json is kept

Each model is saved with `save_pretrained` together with the char tokenizer into `<out>/teacher` and
`<out>/student`; `<out>/card.json` records the task, the architectures, the SFT configs, the wall/CPU time and
the greedy accuracies without p (`acc/<split>`) and with p (`acc_priv/<split>`) on `test` and `ood`.

The pair is one model family (Qwen3 decoder, same tokenizer): the teacher is bigger and trained longer, the only
source of the capability gap. Everything is seeded and single-threaded by default, so a rebuild reproduces the
weights on the same software stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from dopd.models import tiny_qwen3
from dopd.sft import SFTConfig, evaluate, sft
from dopd.tasks.arith import ArithTask
from dopd.tokenizer import char_tokenizer
from dopd.view import PrivilegedView

log = logging.getLogger("build_zoo")

# The task of the default run: 2 operations over operands of 1-2 digits capped at 30 (`*` takes a 2-9 factor),
# ood = 3 operations. See the README (model zoo) for the configurations tried before settling on these.
TASK = dict(n_ops=2, max_digits=2, max_operand=30, ood_extra_ops=1, hint_form="stepwise")
TRAIN_N = 20000  # training questions drawn (seed 0); held-out questions are filtered out of them
HELDOUT_N = 2048  # the first HELDOUT_N test and ood questions (seed 0) are kept out of training
EVAL_N = 512

MODELS = {
    "teacher": dict(
        arch=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=0),
        sft=SFTConfig(steps=800, batch_size=64, lr=5e-3, warmup=100, weight_decay=0.0, hint_prob=0.5,
                      eval_every=200, eval_n=256, seed=0),
    ),
    "student": dict(
        arch=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, seed=0),
        sft=SFTConfig(steps=650, batch_size=64, lr=5e-3, warmup=100, weight_decay=0.0, hint_prob=0.5,
                      eval_every=325, eval_n=256, seed=0),
    ),
}


def data(task: ArithTask):
    heldout = {sp: task.examples(sp, HELDOUT_N, 0) for sp in ("test", "ood")}
    banned = {ex.key for exs in heldout.values() for ex in exs}
    train = [ex for ex in task.examples("train", TRAIN_N, 0) if ex.key not in banned]
    return train, {sp: exs[:EVAL_N] for sp, exs in heldout.items()}


def build(role: str, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    spec = MODELS[role]
    task = ArithTask(**TASK)
    tok = char_tokenizer()
    view = PrivilegedView(tok)
    train, evals = data(task)
    model = tiny_qwen3(len(tok), **spec["arch"])
    n_params = sum(p.numel() for p in model.parameters())
    log.info("[%s] %s, %d parameters, %d training examples", role, spec["arch"], n_params, len(train))
    t0, c0 = time.time(), time.process_time()
    curve = []
    sft(model, view, train, spec["sft"], {"test": evals["test"]}, task,
        on_eval=lambda step, m: curve.append({"step": step, **{k: round(v, 4) for k, v in m.items()}}))
    train_s, train_cpu = time.time() - t0, time.process_time() - c0
    t1 = time.time()
    acc = evaluate(model, view, task, evals, n=EVAL_N)
    eval_s = time.time() - t1
    log.info("[%s] trained in %.0fs, evaluated in %.0fs: %s", role, train_s, eval_s,
             {k: round(v, 3) for k, v in acc.items()})

    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    target = out / role
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    entry = {
        "path": role,  # relative to card.json
        "arch": {"family": "Qwen3ForCausalLM", **spec["arch"], "intermediate_size": model.config.intermediate_size,
                 "vocab_size": model.config.vocab_size, "parameters": n_params},
        "sft": dataclasses.asdict(spec["sft"]),
        "train_examples": len(train),
        "curve": curve,
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "eval_n": EVAL_N,
        "train_wall_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu, 1),
        "eval_wall_s": round(eval_s, 1),
        "threads": threads,
    }
    update_card(out, role, entry)
    return entry


def update_card(out: Path, role: str, entry: dict) -> None:
    """Read-modify-write card.json under a lock, so --parallel builds (and --only rebuilds) keep each other."""
    out.mkdir(parents=True, exist_ok=True)
    lock = os.open(out, os.O_RDONLY)  # flock on the directory itself: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "card.json"
        card = json.loads(path.read_text()) if path.exists() else {}
        card.update({
            "task": {"class": "dopd.tasks.arith.ArithTask", **TASK, "train_n": TRAIN_N, "heldout_n": HELDOUT_N,
                     "seed": 0,
                     "note": "training questions equal to any of the first heldout_n test/ood questions are dropped"},
            "view": {"plain": "Q:{question}\\n", "privileged": "H:{hint}\\nQ:{question}\\n"},
            "tokenizer": "dopd.tokenizer.char_tokenizer()",
            "builder": "scripts/build_zoo.py",
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        })
        card.setdefault("models", {})[role] = entry
        models = card["models"]
        if "teacher" in models and "student" in models:
            t, s = models["teacher"]["accuracy"], models["student"]["accuracy"]
            card["gap"] = {k: round(t[k] - s[k], 4) for k in t}
        path.write_text(json.dumps(card, indent=2) + "\n")
    finally:
        os.close(lock)  # closing releases the lock


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="zoo/arith", help="output directory (default: zoo/arith)")
    ap.add_argument("--only", choices=("teacher", "student"), help="build one model only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1: reproducible, "
                    "and small models gain little from more)")
    ap.add_argument("--parallel", action="store_true", help="build both models at once in two processes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("dopd.sft").setLevel(logging.INFO)
    out = Path(args.out)
    t0 = time.time()
    roles = [args.only] if args.only else ["teacher", "student"]
    if args.parallel and len(roles) > 1:
        procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--only", r,
                                   "--threads", str(args.threads)]) for r in roles]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"build failed: exit codes {dict(zip(roles, codes))}")
    else:
        for role in roles:
            build(role, out, args.threads)
    if not args.only:
        card = json.loads((out / "card.json").read_text())
        card["build_wall_s"] = round(time.time() - t0, 1)
        card["build_mode"] = "parallel" if args.parallel else "sequential"
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("done in %.0fs -> %s", time.time() - t0, out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
