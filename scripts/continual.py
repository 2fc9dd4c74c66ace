"""Fig. 7a, continual learning: distil on one domain after another and measure what the earlier ones lose.

    python scripts/continual.py                              # vanilla and DOPD, seeds 1-3, arith -> vars -> funcs
    python scripts/continual.py --routers dopd --seeds 1 -- trainer.max_steps=50   # extra train.py overrides

Each stage is an ordinary `train.py` run (logged to MLflow experiment `fig7a`, named
`<router>-seed<seed>-stage<k>-<domain>`) that starts from the student the previous stage exported and is evaluated
on all three domains. The table printed at the end (and written to outputs/reports/fig7a/continual.md) gives the
held-out accuracy per domain after each stage, and the forgetting of each domain: its accuracy right after the
stage that trained it minus its accuracy at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("arith", "vars", "funcs")


def stage(router: str, seed: int, k: int, domain: str, student: str | None, out: Path, extra: list[str]) -> Path:
    run_dir = out / f"{router}-seed{seed}" / f"stage{k}-{domain}"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=_cpu_testbed", f"router={router}", f"seed={seed}",
           f"task.domains=[{domain}]", f"task.eval_domains=[{','.join(DOMAINS)}]", "export_student=true",
           "logger.experiment=fig7a", f"logger.run_name={router}-seed{seed}-stage{k}-{domain}",
           f"hydra.run.dir={run_dir}", *([f"model.student.path={student}"] if student else []), *extra]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


def table(uri: str, routers, seeds) -> str:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("fig7a")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id]) if r.info.status == "FINISHED"}
    head = [f"after {d} ({k + 1})" for k, d in enumerate(DOMAINS)]
    lines = ["| router | domain | " + " | ".join(head) + " | forgetting |", "|---" * (len(head) + 3) + "|"]
    for router in routers:
        for d_i, domain in enumerate(DOMAINS):
            cells, per_stage = [], []
            for k, trained in enumerate(DOMAINS):
                vals = [runs[n].data.metrics.get(f"eval/acc/test/{domain}") for s in seeds
                        if (n := f"{router}-seed{s}-stage{k + 1}-{trained}") in runs]
                vals = [v for v in vals if v is not None]
                per_stage.append(statistics.mean(vals) if vals else float("nan"))
                cells.append(f"{100 * per_stage[-1]:.1f}" + (f" ± {100 * statistics.stdev(vals):.1f}" if len(vals) > 1 else ""))
            forget = per_stage[d_i] - per_stage[-1]
            lines.append(f"| {router} | {domain} | " + " | ".join(cells) + f" | {100 * forget:+.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="vanilla,dopd")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "continual"))
    ap.add_argument("--tracking-uri", default=f"sqlite:///{ROOT}/outputs/mlflow.db")
    ap.add_argument("--report-only", action="store_true", help="print the table from MLflow without training")
    ap.add_argument("extra", nargs="*", help="train.py overrides for every stage (after --)")
    args = ap.parse_args(argv)
    routers, seeds = args.routers.split(","), [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        for router in routers:
            for seed in seeds:
                student = None
                for k, domain in enumerate(DOMAINS, 1):
                    student = str(stage(router, seed, k, domain, student, Path(args.out), args.extra) / "student")
    md = table(args.tracking_uri, routers, seeds)
    report = ROOT / "outputs" / "reports" / "fig7a" / "continual.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
