"""Turn a sweep's MLflow runs into the paper's tables (Tables 1 and 3), curves (Figs. 3 and 8) and sensitivity plots
(Fig. 10): `python -m dopd.report EXPERIMENT ...` (or `dopd-report`; `--help` for the options).

The pure part is apart from the MLflow I/O and the figures, so it can be tested on hand-made numbers:

    stats.py   95% Student-t intervals, mean ± std over seeds (Stat, summarize), moving averages, curve bands
    runs.py    MLflow I/O: connect, select_runs (the sweep's finished children), load_run -> RunData; ReportError
    tables.py  swept keys, rows (group_runs), tables with reference rows and Δ / gain / gap recovered; md, tex, csv
    plots.py   curves over steps and sensitivity plots (matplotlib, imported when drawing)
    cli.py     report() (all of the above, written to --out and logged on the parent run) and main()

Every name below is importable from `dopd.report`, as when it was one module.
"""

from dopd.report.cli import DEFAULT_CURVES, Report, main, report
from dopd.report.plots import plot_curves, plot_sensitivity, sensitivity_points
from dopd.report.runs import ACC, DEFAULT_URI, TEACHER, ReportError, RunData, connect, load_run, select_runs
from dopd.report.stats import Stat, band, moving_average, summarize, t975
from dopd.report.tables import (AVG, CSV_HEADER, SPLIT_ORDER, Group, Row, Table, build_table, csv_rows, group_runs,
                                mark_best, paper_table, row_label, run_value, split_columns, sweep_overrides,
                                teacher_final, to_latex, to_markdown)

__all__ = [
    "ACC", "AVG", "CSV_HEADER", "DEFAULT_CURVES", "DEFAULT_URI", "SPLIT_ORDER", "TEACHER",
    "Group", "Report", "ReportError", "Row", "RunData", "Stat", "Table",
    "band", "build_table", "connect", "csv_rows", "group_runs", "load_run", "main", "mark_best", "moving_average",
    "paper_table", "plot_curves", "plot_sensitivity", "report", "row_label", "run_value", "select_runs",
    "sensitivity_points", "split_columns", "summarize", "sweep_overrides", "t975", "teacher_final", "to_latex",
    "to_markdown",
]
