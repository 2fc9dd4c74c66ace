"""Which response tokens land in each DOPD regime at the start of a run, and why (precondition (ii) of the testbed).

    python scripts/regime_anatomy.py                                   # the default pair and task (experiment=table1)
    python scripts/regime_anatomy.py model=reason_m_s task.n_steps=3   # any Hydra override of train.py
    python scripts/regime_anatomy.py --prompts 256 --json anatomy.json

It does what the first DOPD step does (the student samples `rollout.n` responses per prompt from x alone; the
teacher and the student are re-run with p; `dopd.routing.assign_regimes` with the router's gap settings), over
`--prompts` training prompts in batches of `data.batch_size`, and breaks each regime down by the kind of token
(the task's `token_kinds`, e.g. plan / result / copy digits on the reasoning testbed) and by whether the sampled
token is the privileged teacher's arg-max ("right") or not ("wrong"). Per kind it also prints the quantiles of
A = |log q_T - log q_S| and the medians of q_S and q_T, which show where the thresholds fall.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dopd.pipeline import compose_config  # noqa: E402
from dopd.routing import REGIMES, Gap, assign_regimes  # noqa: E402


def compose(overrides: list[str]):
    return compose_config(["experiment=table1", "router=dopd", *overrides])


def tally(regime, kinds, right, gap, mask) -> tuple[Counter, dict]:
    """Counts of (regime, kind, right/wrong) and per-(kind, right) lists of (A, q_S, q_T), over masked tokens."""
    counts, stats = Counter(), defaultdict(list)
    a, q_s, q_t = gap.advantage, gap.log_q_student.exp(), gap.log_q_teacher.exp()
    for i, row in enumerate(kinds):
        for j, kind in enumerate(row):
            if not mask[i, j]:
                continue
            ok = "right" if right[i, j] else "wrong"
            counts[(REGIMES[int(regime[i, j])], kind, ok)] += 1
            stats[(kind, ok)].append((float(a[i, j]), float(q_s[i, j]), float(q_t[i, j])))
    return counts, stats


def summarise(counts: Counter, stats: dict) -> dict:
    total = sum(counts.values())
    out = {"tokens": total, "regimes": {}, "kinds": {}}
    for r in REGIMES:
        parts = {f"{k}/{ok}": n / total for (rr, k, ok), n in sorted(counts.items()) if rr == r}
        out["regimes"][r] = {"share": sum(parts.values()), "by_kind": parts}

    def q(xs, f):
        return sorted(xs)[int(f * (len(xs) - 1))]

    for (kind, ok), vals in sorted(stats.items()):
        a = [v[0] for v in vals]
        out["kinds"][f"{kind}/{ok}"] = {
            "share": len(vals) / total, "A_q25": q(a, 0.25), "A_q50": q(a, 0.5), "A_q75": q(a, 0.75),
            "A_q90": q(a, 0.9), "q_S_median": q([v[1] for v in vals], 0.5), "q_T_median": q([v[2] for v in vals], 0.5)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    ap.add_argument("--prompts", type=int, default=128, help="training prompts to sample from (default 128)")
    ap.add_argument("--json", help="write the breakdown here")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from dopd.models import load_pair
    from dopd.pipeline import build_router, build_task, build_view
    from dopd.rollout import sample
    from dopd.view import response_logits
    from dopd.visualize import token_strings

    cfg = compose(args.overrides)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    task, router = build_task(cfg.task), build_router(cfg.router)
    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True), root=ROOT)
    view, r = build_view(cfg, pair.tokenizer), cfg.rollout
    examples = task.examples("train", args.prompts, cfg.data.seed)
    kinds_of = getattr(task, "token_kinds", None)
    counts, stats, thresholds = Counter(), defaultdict(list), []
    for start in range(0, len(examples), cfg.data.batch_size):
        roll = sample(pair.student, view, examples[start:start + cfg.data.batch_size], n=r.n,
                      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        priv = view.contexts(roll.examples, privileged=True)
        with torch.no_grad():
            teacher = response_logits(pair.teacher, priv, roll.tokens, roll.mask, roll.n)
            student = response_logits(pair.student, priv, roll.tokens, roll.mask, roll.n)
        gap = Gap.from_logits(teacher, student, roll.tokens, router.temperature)
        regime, th = assign_regimes(gap, roll.mask, router.gap)
        thresholds.append(th)
        kinds = [kinds_of(p) if kinds_of else ["token"] * len(p) for p in token_strings(pair.tokenizer, roll.tokens)]
        c, s = tally(regime, kinds, teacher.argmax(-1) == roll.tokens, gap, roll.mask)
        counts.update(c)
        for key, vals in s.items():
            stats[key].extend(vals)

    out = summarise(counts, stats)
    out["thresholds"] = {k: sum(t[k] for t in thresholds) / len(thresholds) for k in thresholds[0]}
    out["overrides"] = args.overrides
    print(f"{out['tokens']} response tokens, {len(examples)} prompts x {r.n}; mean thresholds "
          + ", ".join(f"{k} {v:.3f}" for k, v in out["thresholds"].items()))
    for name, reg in out["regimes"].items():
        parts = "  ".join(f"{k} {v:.1%}" for k, v in reg["by_kind"].items() if v >= 0.002)
        print(f"{name} {reg['share']:6.1%}   {parts}")
    print(f"{'kind':16} {'share':>6} {'A q25':>7} {'q50':>6} {'q75':>6} {'q90':>6} {'q_S med':>8} {'q_T med':>8}")
    for kind, k in out["kinds"].items():
        print(f"{kind:16} {k['share']:6.1%} {k['A_q25']:7.2f} {k['A_q50']:6.2f} {k['A_q75']:6.2f} {k['A_q90']:6.2f} "
              f"{k['q_S_median']:8.2f} {k['q_T_median']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
