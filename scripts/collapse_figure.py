#!/usr/bin/env python
"""The mechanism of a DOPD run's collapse, from the MLflow runs of `callbacks=anatomy` (dopd/anatomy.py).

    python train.py -m experiment=table1_d0 router=dopd seed=1,2,3 callbacks=anatomy logger.sweep_name=d0-anatomy
    python scripts/collapse_figure.py table1_d0 --sweep d0-anatomy --out experiments/results/collapse_d0

Per regime over training, mean (and std) over the sweep's runs: the share of response tokens, the gradient norm
its rule alone sends into the student, and, for the self-anchor regimes (LL, HS), the probability of the sampled
token under the rule's target against the trained student's; the share of EOS tokens per regime; the held-out
accuracy. Writes `collapse.png` and `collapse.csv` (every number the figure shows) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dopd.report import DEFAULT_URI, ReportError, band, connect, load_run, select_runs  # noqa: E402
from dopd.routing import REGIMES  # noqa: E402

COLOURS = {"LH": "#d4a017", "LL": "#888888", "HT": "#2e8b57", "HS": "#1f5fbf"}
PANELS = [("share", "share of response tokens"), ("grad_norm", "gradient norm of the rule alone"),
          ("eos/share", "EOS tokens in the regime (share of all tokens)")]


def series(runs, experiment_metrics: list[str]) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """metric -> (steps, mean, std) over the runs."""
    return {m: band([r.curves[m] for r in runs if m in r.curves]) for m in experiment_metrics
            if any(m in r.curves for r in runs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--sweep", help="the sweep's name (default: the experiment's newest sweep)")
    ap.add_argument("--all", action="store_true", help="every finished run of the experiment, not one sweep's")
    ap.add_argument("--tracking-uri", default=DEFAULT_URI)
    ap.add_argument("--out", default="outputs/collapse", help="folder for collapse.png and collapse.csv")
    args = ap.parse_args(argv)
    try:
        client = connect(args.tracking_uri)
        _, finished, skipped = select_runs(client, args.experiment, sweep=args.sweep, all_runs=args.all)
    except ReportError as err:
        print(f"collapse_figure: {err}", file=sys.stderr)
        return 2
    metrics = [f"anatomy/{r}/{k}" for r in REGIMES for k in ("share", "grad_norm", "eos/share", "q_target",
                                                             "q_student", "eos_q_student")]
    metrics.append("eval/acc/avg")
    metrics.append("train/response_len")
    kinds = sorted({k for r in finished for k in r.data.metrics if k.startswith("anatomy/") and k.count("/") == 3
                    and k.endswith("/share") and not k.endswith("/eos/share")})
    metrics += kinds  # per regime and kind of token: in the CSV and the printed table
    runs = [load_run(client, r, tuple(metrics)) for r in finished]
    runs = [r for r in runs if any(m.startswith("anatomy/") and m in r.curves for m in metrics)]
    if not runs:
        print(f"collapse_figure: no run of {args.experiment!r} has anatomy/* metrics (train with callbacks=anatomy)",
              file=sys.stderr)
        return 2
    data = series(runs, metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "collapse.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "step", "mean", "std", "runs"])
        for m, (steps, mean, std) in data.items():
            for s, mu, sd in zip(steps, mean, std):
                w.writerow([m, s, f"{mu:.6g}", f"{sd:.6g}", len(runs)])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.0))
    for ax, (key, label) in zip(axes, PANELS):
        for r in REGIMES:
            if f"anatomy/{r}/{key}" in data:
                steps, mean, std = data[f"anatomy/{r}/{key}"]
                ax.plot(steps, mean, color=COLOURS[r], label=r)
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=COLOURS[r], alpha=0.2)
        ax.set_title(label, fontsize=10)
    ax = axes[3]
    for r in ("LL", "HS"):
        for key, style in (("q_target", "-"), ("q_student", "--")):
            if f"anatomy/{r}/{key}" in data:
                steps, mean, _ = data[f"anatomy/{r}/{key}"]
                ax.plot(steps, mean, style, color=COLOURS[r], label=f"{r} {key}")
    ax.set_title("self-anchor: p(sampled token), target (-) vs student (--)", fontsize=10)
    if "eval/acc/avg" in data:
        steps, mean, std = data["eval/acc/avg"]
        axes[4].plot(steps, mean, color="black", label="eval/acc/avg")
        axes[4].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color="black", alpha=0.15)
    axes[4].set_title("held-out accuracy without p", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.experiment} {args.sweep or ''}: {len(runs)} run(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "collapse.png", dpi=110)
    plt.close(fig)

    steps = data["anatomy/HS/share"][0]
    picks = sorted({steps[0], *steps[:: max(1, len(steps) // 6)], steps[-1]})
    print(f"{len(runs)} run(s); mean over runs at steps {picks}")
    for m, (st, mean, _) in data.items():
        at = dict(zip(st, mean))
        print(f"{m:28} " + " ".join(f"{at[s]:8.4f}" if s in at else "       -" for s in picks))
    if skipped:
        print(f"skipped: {', '.join(skipped)}")
    print(f"wrote {out / 'collapse.png'} and {out / 'collapse.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
