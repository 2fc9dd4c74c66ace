"""Turn a sweep's MLflow runs into the paper's tables (Tables 1 and 3), curves (Figs. 3 and 8) and sensitivity plots
(Fig. 10).

    python -m dopd.report EXPERIMENT [--parent RUN_ID | --sweep NAME | --all] [--where k=v] [--rows k1,k2]
                             [--paper FILE]

Rows are methods (the keys the sweep varies, `seed` aside), columns the evaluation splits plus Avg; each cell is the
final-step accuracy in %, mean ± std over seeds. Reference rows (the student at step 0 and the frozen teacher) give
the gain and the share of the teacher-student gap each method recovers, as the paper reports it. Markdown, LaTeX,
CSV, PNG curves and, for a sweep over one or two numeric keys, a sensitivity plot go to `--out` and, as artifacts
under `report/`, to the sweep's parent run.

The command line and report(): read the runs, build the tables and figures, write them and log them.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dopd.report.plots import plot_curves, plot_sensitivity
from dopd.report.runs import ACC, DEFAULT_URI, ReportError, connect, load_run, select_runs
from dopd.report.tables import (AVG, CSV_HEADER, Table, build_table, csv_rows, group_runs, paper_table, run_value,
                                split_columns, sweep_overrides, to_latex, to_markdown)

DEFAULT_CURVES = ("eval/acc/avg", "train/entropy")


@dataclass
class Report:
    experiment: str
    parent_id: str | None
    tables: list[Table]
    skipped: list[str]
    markdown: str
    files: list[Path]
    logged: bool


def report(experiment: str, tracking_uri: str = DEFAULT_URI, *, parent: str | None = None, sweep: str | None = None,
           all_runs: bool = False, rows: list[str] | None = None, baseline: str | None = None,
           curves: tuple[str, ...] = DEFAULT_CURVES, smooth: int = 5, paper: str | Path | None = None,
           out: str | Path | None = None, log: bool = True, where: dict[str, str] | None = None) -> Report:
    """Read the runs, build the tables and figures, write them to `out` and log them on the parent run.

    `where` keeps only the runs whose value of each key (as `--rows` reads it: param, tag or group name) matches,
    e.g. {"task.hint_form": "stepwise"} to leave a control sweep's runs out of an `--all` report."""
    client = connect(tracking_uri)
    parent_run, finished, skipped = select_runs(client, experiment, parent, sweep, all_runs)
    runs = [load_run(client, r, tuple(curves)) for r in finished]
    for key, value in (where or {}).items():
        seen = sorted({run_value(r, key) for r in runs})
        runs = [r for r in runs if run_value(r, key) == value]
        if not runs:
            raise ReportError(f"--where {key}={value}: no finished run has it; values of {key}: {', '.join(seen)}")

    overrides = parent_run.data.tags.get("overrides", "") if parent_run else ""
    swept = sweep_overrides(overrides)
    keys = rows or [k for k in swept if k != "seed"] or ["router"]
    groups = group_runs(runs, keys, swept)
    metrics = {m for r in runs for m in r.final}
    splits = split_columns(metrics)
    columns = splits + ([AVG] if ACC + "avg" in metrics else [])
    if not columns:
        raise ReportError(f"the finished runs logged no {ACC}* metric (did they evaluate?)")

    source = (f"sweep `{parent_run.info.run_name}` ({parent_run.info.run_id})" if parent_run
              else "all finished runs")
    note = (f"{len(runs)} finished run(s)" + "".join(f" with {k}={v}" for k, v in (where or {}).items())
            + f" in {len(groups)} row(s), grouped by {', '.join(keys)}"
            + (" (sweep: `" + " ".join(k + "=" + ",".join(v) for k, v in swept.items()) + "`)" if swept else "") + ". "
            "Final-step accuracy without p in %, mean ± std over seeds (n = seeds; 95% Student-t CIs in report.csv). "
            "**Best** and <u>second</u> per column among the methods. Δ, gain and gap recovered are on "
            f"{AVG if AVG in columns else columns[0]}: gain = method − student (start), gap recovered % = "
            "gain / (teacher − student (start)); student (start) is the step-0 evaluation, teacher the frozen "
            "teacher without p.")
    if skipped:
        note += f"\n\nSkipped {len(skipped)} unfinished or failed run(s): {', '.join(skipped)}."
    tables = [build_table(groups, columns, f"{experiment}: {source}", baseline)]
    tables[0].note = note
    domains = split_columns(metrics, domains=True)
    if domains:
        tables.append(build_table(groups, domains, f"{experiment}: accuracy by domain (%)", baseline))
        tables[-1].name = "domains"
    if paper:
        import yaml

        if not Path(paper).is_file():
            raise ReportError(f"--paper {paper}: no such file")
        published = yaml.safe_load(Path(paper).read_text()) or {}
        ptable = paper_table(published, f"Paper's published numbers (paper, GPU scale; from {Path(paper).name})")
        ptable.note = ("Real Qwen3 pairs on real benchmarks, not this testbed: compare the ordering and the "
                       "gap recovered, not the absolute values.")
        ptable.name = "paper"
        tables.append(ptable)

    out_dir = Path(out) if out else Path("outputs/reports") / experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = f"# Report: {experiment}\n\n" + "\n".join(to_markdown(t) for t in tables)
    files = [out_dir / "report.md", out_dir / "report.tex", out_dir / "report.csv"]
    files[0].write_text(markdown)
    files[1].write_text("% \\usepackage{booktabs}\n" + "\n".join(to_latex(t) for t in tables))
    with open(files[2], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for t in tables:
            writer.writerows(csv_rows(t))
    summary = AVG if AVG in columns else columns[0]
    png = plot_sensitivity(groups, tables[0], keys, summary, out_dir / "sensitivity.png")
    if png is not None:
        files.append(png)
    for metric in curves:
        png = plot_curves(groups, metric, out_dir / f"curve_{re.sub(r'[^A-Za-z0-9]+', '_', metric)}.png", smooth)
        if png is not None:
            files.append(png)

    logged = False
    if log and parent_run:
        try:
            for path in files:
                client.log_artifact(parent_run.info.run_id, str(path), "report")
            logged = True
        except Exception as err:  # an unwritable artifact store must not lose the report written above
            print(f"dopd-report: could not log the report on run {parent_run.info.run_id}: {err}", file=sys.stderr)
    return Report(experiment, parent_run.info.run_id if parent_run else None, tables, skipped, markdown, files,
                  logged)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dopd-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="MLflow experiment name (logger.experiment of the sweep)")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help=f"default {DEFAULT_URI}")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--parent", metavar="RUN_ID", help="this sweep parent run (default: the newest sweep)")
    pick.add_argument("--sweep", metavar="NAME", help="the newest sweep parent run with this name")
    pick.add_argument("--all", action="store_true", help="every finished run of the experiment, not one sweep")
    p.add_argument("--rows", help="comma-separated row keys, e.g. router,task.hint_form (default: the swept keys "
                                  "other than seed, else router)")
    p.add_argument("--where", metavar="KEY=VALUE", action="append", default=[],
                   help="keep only the runs with this value of a key (repeatable), e.g. task.hint_form=stepwise")
    p.add_argument("--baseline", metavar="ROW", help="row label for the Δ column (default: the matching vanilla row)")
    p.add_argument("--curves", default=",".join(DEFAULT_CURVES), help="comma-separated metrics to plot over steps "
                                                                      "('' for none)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window (steps) for train/* curves")
    p.add_argument("--paper", metavar="FILE", help="YAML {row: {column: value}} of the paper's published numbers")
    p.add_argument("--out", help="output folder (default outputs/reports/EXPERIMENT, under the current folder)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as artifacts on the parent run")
    a = p.parse_args(argv)
    bad = [w for w in a.where if "=" not in w]
    if bad:
        p.error(f"--where takes KEY=VALUE, got {bad[0]!r}")
    try:
        rep = report(a.experiment, a.tracking_uri, parent=a.parent, sweep=a.sweep, all_runs=a.all,
                     rows=[k.strip() for k in a.rows.split(",")] if a.rows else None, baseline=a.baseline,
                     curves=tuple(c for c in a.curves.split(",") if c), smooth=a.smooth, paper=a.paper, out=a.out,
                     log=not a.no_log, where=dict(w.split("=", 1) for w in a.where))
    except ReportError as err:
        print(f"dopd-report: {err}", file=sys.stderr)
        return 2
    print(rep.markdown)
    print(f"wrote {', '.join(str(f) for f in rep.files)}")
    if rep.logged:
        print(f"logged them under report/ on parent run {rep.parent_id}")
    elif not a.no_log and rep.parent_id is None:
        print("not logged to MLflow: --all has no sweep parent run")
    return 0
