"""Turn a sweep's MLflow runs into the paper's tables (Tables 1 and 3), curves (Figs. 3 and 8) and sensitivity plots
(Fig. 10).

    python -m dopd.report EXPERIMENT [--parent RUN_ID | --sweep NAME | --all] [--where k=v] [--rows k1,k2]
                             [--paper FILE]

Rows are methods (the keys the sweep varies, `seed` aside), columns the evaluation splits plus Avg; each cell is the
final-step accuracy in %, mean ± std over seeds. Reference rows (the student at step 0 and the frozen teacher) give
the gain and the share of the teacher-student gap each method recovers, as the paper reports it. Markdown, LaTeX,
CSV, PNG curves and, for a sweep over one or two numeric keys, a sensitivity plot go to `--out` and, as artifacts
under `report/`, to the sweep's parent run.

The pure part (statistics, grouping, layout) is separate from the MLflow I/O at the bottom, so it can be tested on
hand-made numbers.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_URI = "sqlite:///outputs/mlflow.db"
DEFAULT_CURVES = ("eval/acc/avg", "train/entropy")
ACC = "eval/acc/"
TEACHER = "ref/teacher/acc/"
SPLIT_ORDER = ("id", "test", "val", "ood")  # then the others alphabetically, Avg last
AVG = "Avg"

# Two-sided 95% Student t quantiles, used when scipy is missing (scipy ships with mlflow, so rarely).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


class ReportError(Exception):
    """A problem the user can fix (wrong experiment, no sweep, nothing finished): printed without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------

def t975(df: int) -> float:
    """Two-sided 95% t quantile; the table falls back to the nearest smaller df (a slightly wider, safe interval)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


@dataclass
class Stat:
    """Mean, sample std (ddof=1), n and 95% CI half-width over seeds; std and CI are NaN for a single seed."""
    mean: float
    std: float
    n: int
    ci95: float
    values: tuple[float, ...] = ()


def summarize(values) -> Stat:
    vals = tuple(float(v) for v in values if v is not None and not math.isnan(v))
    n = len(vals)
    if n == 0:
        return Stat(math.nan, math.nan, 0, math.nan)
    mean = sum(vals) / n
    if n == 1:
        return Stat(mean, math.nan, 1, math.nan, vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return Stat(mean, std, n, t975(n - 1) * std / math.sqrt(n), vals)


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average: per-step train/* metrics are noisy, and a centred window does not shift them against
    the evaluation curves; near the ends it shrinks symmetrically, so a trend is not bent there."""
    out = []
    for i in range(len(values)):
        half = min(window // 2, i, len(values) - 1 - i)
        chunk = values[i - half: i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def band(histories: list[list[tuple[int, float]]], smooth: int = 1) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std (ddof=0) across seeds of per-seed (step, value) series, each smoothed first."""
    by_step: dict[int, list[float]] = {}
    for hist in histories:
        steps = [s for s, _ in hist]
        for s, v in zip(steps, moving_average([v for _, v in hist], smooth)):
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    std = [math.sqrt(sum((v - m) ** 2 for v in by_step[s]) / len(by_step[s])) for s, m in zip(steps, mean)]
    return steps, mean, std


# ---------------------------------------------------------------------------------------------------------------
# Runs and rows
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunData:
    """What the report needs from one finished child run."""
    name: str
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    final: dict[str, float]                                     # last-step value of every metric
    start: dict[str, float] = field(default_factory=dict)       # step-0 value of every eval/acc/* metric
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def sweep_overrides(overrides: str) -> dict[str, list[str]]:
    """The keys a multirun varies, each with its values in the order given (`router=vanilla,dopd seed=1,2`)."""
    try:
        tokens = shlex.split(overrides, posix=False)
    except ValueError:
        tokens = overrides.split()
    swept: dict[str, list[str]] = {}
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
    except ImportError:
        parser = None
    for tok in tokens:
        key, values = None, None
        if parser is not None:
            try:
                (ov,) = parser.parse_overrides([tok])
                if ov.is_sweep_override():
                    key = ov.key_or_group
                    try:
                        values = list(ov.sweep_string_iterator())
                    except Exception:  # glob(...) needs a config loader
                        values = []
                else:
                    continue
            except Exception:
                pass
        if key is None and "=" in tok:
            k, v = tok.split("=", 1)
            if "," in v or v.startswith(("range(", "choice(", "glob(")):
                key, values = k, v.split(",")
        if key is not None:
            swept[key.lstrip("+~")] = values or []
    return swept


def run_value(run: RunData, key: str) -> str:
    """A row key's value for a run: the param (`task.hint_form` -> `task/hint_form`), a tag (config groups such as
    `router` and `ablation` are tagged), the group's `name` param (`model` -> `model/name`), or, for runs logged
    before groups were tagged, the `key=value` the run's name carries for each swept key (`vanilla-seed1-ablation=x`)."""
    pkey = key.replace(".", "/")
    for source, k in ((run.params, pkey), (run.tags, key), (run.params, pkey + "/name")):
        if k in source:
            return source[k]
    for part in run.name.split("-", 2)[-1].split(","):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return "<missing>"


def row_label(values: dict[str, str]) -> str:
    """A bare value for one key; `router` bare and the others as `short=value` for several."""
    if len(values) == 1:
        return next(iter(values.values()))
    shorts = [k.replace("/", ".").rsplit(".", 1)[-1] for k in values]
    return ", ".join(v if k == "router" else f"{s if shorts.count(s) == 1 else k}={v}"
                     for (k, v), s in zip(values.items(), shorts))


@dataclass
class Group:
    """The runs of one table row (one method), with the key values that define it."""
    label: str
    values: dict[str, str]
    runs: list[RunData]

    @property
    def router(self) -> str | None:
        routers = {r.tags.get("router") for r in self.runs}
        return self.values.get("router") or (routers.pop() if len(routers) == 1 else None)

    @property
    def pair(self) -> str | None:
        pairs = {r.tags.get("pair", "") for r in self.runs}
        return pairs.pop() if len(pairs) == 1 else None


def group_runs(runs: list[RunData], keys: list[str], order: dict[str, list[str]] | None = None) -> list[Group]:
    """Rows keyed by `keys`, ordered as the sweep lists the values (else vanilla first, then alphabetically)."""
    order = order or {}
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = {k: run_value(run, k) for k in keys}
        key = tuple(values.values())
        if key not in groups:
            groups[key] = Group(row_label(values), values, [])
        groups[key].runs.append(run)

    def rank(g: Group):
        out = []
        for k, v in g.values.items():
            given = order.get(k, [])
            out.append((given.index(v), "") if v in given else (len(given) + (v != "vanilla"), v))
        return out

    return sorted(groups.values(), key=rank)


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    label: str
    kind: str                                   # "method", "reference" (student/teacher) or "gap" (Δ gap)
    cells: dict[str, Stat]                      # column -> Stat, in percent
    extra: dict[str, float] = field(default_factory=dict)   # Δ vs baseline, gain, gap recovered (percent points)
    marks: dict[str, str] = field(default_factory=dict)     # column -> "best" | "second"
    n: int = 0


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[Row]
    extras: list[str] = field(default_factory=list)
    note: str = ""
    name: str = "main"                          # the table's id in report.csv

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


def split_columns(metrics, domains: bool = False) -> list[str]:
    """Split names under eval/acc/ (or `split/domain` names when `domains`), test/id first, then ood, then others."""
    names = {m[len(ACC):] for m in metrics if m.startswith(ACC)} - {"avg"}
    names = {n for n in names if ("/" in n) == domains}

    def rank(name: str):
        split = name.split("/", 1)[0]
        return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split, name)

    return sorted(names, key=rank)


def _metric(column: str, prefix: str = ACC) -> str:
    return prefix + ("avg" if column == AVG else column)


def teacher_final(run: RunData, column: str) -> float | None:
    """The frozen teacher's accuracy without p; its Avg is the mean over the splits when not logged itself."""
    if column != AVG or TEACHER + "avg" in run.final:
        return run.final.get(_metric(column, TEACHER))
    splits = split_columns(run.final)
    vals = [run.final.get(TEACHER + s) for s in splits]
    return sum(vals) / len(vals) if splits and None not in vals else None


def build_table(groups: list[Group], columns: list[str], title: str, baseline: str | None = None) -> Table:
    """Method rows (final values over seeds) and, when the runs logged them, the paper's reference rows and the
    Δ vs vanilla / gain / gap-recovered columns, all computed on the Avg column (or the only column)."""
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    methods = []
    for g in groups:
        cells = {c: summarize([pct(r.final.get(_metric(c))) for r in g.runs]) for c in columns}
        methods.append(Row(g.label, "method", {c: s for c, s in cells.items() if s.n}, n=len(g.runs)))
    table = Table(title, columns, [])
    key = AVG if AVG in columns else (columns[0] if len(columns) == 1 else None)

    # Reference rows per teacher-student pair: the student at step 0 and the frozen teacher.
    refs: dict[str | None, tuple[Stat | None, Stat | None]] = {}
    ref_rows: list[Row] = []
    pairs = list(dict.fromkeys(g.pair for g in groups if g.pair is not None))
    for pair in pairs:
        runs = [r for g in groups if g.pair == pair for r in g.runs]
        suffix = f" ({pair})" if len(pairs) > 1 else ""
        teacher = {c: summarize([pct(teacher_final(r, c)) for r in runs]) for c in columns}
        start = {c: summarize([pct(r.start.get(_metric(c))) for r in runs]) for c in columns}
        teacher, start = ({c: s for c, s in d.items() if s.n} for d in (teacher, start))
        if teacher:
            ref_rows.append(Row("teacher" + suffix, "reference", teacher, n=len(runs)))
        if start:
            ref_rows.append(Row("student (start)" + suffix, "reference", start, n=len(runs)))
        if teacher and start:
            gap = {c: Stat(teacher[c].mean - start[c].mean, math.nan, 0, math.nan)
                   for c in columns if c in teacher and c in start}
            ref_rows.append(Row("Δ gap" + suffix, "gap", gap))
        refs[pair] = (start.get(key), teacher.get(key))

    # Extra columns on the summary column: Δ vs the matching vanilla row, gain over the start, gap recovered.
    delta = "Δ vs " + (baseline or "vanilla")
    if key is not None:
        for g, row in zip(groups, methods):
            base = _baseline(g, groups, baseline)
            base_row = methods[groups.index(base)] if base is not None else None
            if base_row is not None and key in row.cells and key in base_row.cells:
                row.extra[delta] = row.cells[key].mean - base_row.cells[key].mean
            start, teacher = refs.get(g.pair, (None, None))
            if start is not None and key in row.cells:
                row.extra["gain"] = row.cells[key].mean - start.mean
                if teacher is not None and abs(teacher.mean - start.mean) > 1e-9:
                    row.extra["gap recovered %"] = 100.0 * row.extra["gain"] / (teacher.mean - start.mean)
    table.extras = [e for e in (delta, "gain", "gap recovered %")
                    if any(e in r.extra for r in methods)]
    table.rows = ref_rows + methods
    mark_best(table)
    return table


def _baseline(g: Group, groups: list[Group], name: str | None) -> Group | None:
    """The row to subtract: `name` if given, else the vanilla row that agrees with `g` on every other row key."""
    if name is not None:
        match = [h for h in groups if h.label == name]
        if not match:
            raise ReportError(f"--baseline {name!r} is not a row; rows: {', '.join(h.label for h in groups)}")
    else:
        others = {k: v for k, v in g.values.items() if k != "router"}
        match = [h for h in groups if h.router == "vanilla"
                 and {k: v for k, v in h.values.items() if k != "router"} == others]
    return match[0] if len(match) == 1 and match[0] is not g else None


def mark_best(table: Table, decimals: int = 1) -> None:
    """Bold the best and underline the second best method per column, on the rounded (displayed) means so that
    ties are marked alike; a lone method is not marked."""
    for col in table.columns:
        have = [r for r in table.rows if r.kind == "method" and col in r.cells]
        ranked = sorted({round(r.cells[col].mean, decimals) for r in have}, reverse=True)
        for r in have if len(ranked) > 1 else []:  # all equal: nothing stands out
            v = round(r.cells[col].mean, decimals)
            if v == ranked[0]:
                r.marks[col] = "best"
            elif len(have) > 2 and v == ranked[1]:
                r.marks[col] = "second"


def paper_table(published: dict, title: str) -> Table:
    """The paper's numbers ({row: {column: value}}, in %), marked the same way; teacher/student/Δ rows are
    references, as in the paper."""
    if not isinstance(published, dict) or not all(isinstance(c, dict) for c in published.values()):
        raise ReportError("--paper expects a YAML mapping {row name: {column: value}}")
    columns = list(dict.fromkeys(c for cols in published.values() for c in cols))
    rows = []
    for label, cols in published.items():
        kind = "reference" if re.match(r"(?i)(teacher|student|δ|delta)", str(label)) else "method"
        cells = {}
        for c, v in cols.items():
            try:
                cells[c] = Stat(float(v), math.nan, 1, math.nan)
            except (TypeError, ValueError):  # "–", null: an empty cell
                pass
        rows.append(Row(str(label), kind, cells, n=1))
    table = Table(title, columns, rows)
    mark_best(table)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Layout: Markdown, LaTeX, CSV
# ---------------------------------------------------------------------------------------------------------------

def _num(v: float, signed: bool = False) -> str:
    return "" if v is None or math.isnan(v) else (f"{v:+.1f}" if signed else f"{v:.1f}")


def _cell(row: Row, col: str, pm: str) -> str:
    s = row.cells.get(col)
    if s is None:
        return ""
    text = _num(s.mean, signed=row.kind == "gap")
    if row.kind == "method" and not math.isnan(s.std):
        text += f"{pm}{s.std:.1f}"
    if row.kind == "method" and s.n != row.n:
        text += f" (n={s.n})"
    return text


def _show_n(table: Table) -> bool:
    return any(r.n > 1 for r in table.rows)


def to_markdown(table: Table) -> str:
    show_n = _show_n(table)
    head = ["Method", *(["n"] if show_n else []), *table.columns, *table.extras]
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = []
        for c in table.columns:
            text = _cell(r, c, " ± ")
            mark = r.marks.get(c)
            cells.append(f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text)
        extras = [_num(r.extra.get(e), signed=not e.endswith("%")) for e in table.extras]
        n = [str(r.n) if r.kind == "method" else ""] if show_n else []
        lines.append("| " + " | ".join([r.label, *n, *cells, *extras]) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    out = re.sub(r"([_%&#$])", r"\\\1", str(text).replace("`", ""))
    out = out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")
    return out.replace("Δ", r"$\Delta$").replace("±", r"$\pm$")


def to_latex(table: Table) -> str:
    """A booktabs table (\\usepackage{booktabs}); reference rows above a rule, as in the paper's Table 1."""
    show_n = _show_n(table)
    head = ["Method", *(["$n$"] if show_n else []), *map(_tex, table.columns), *map(_tex, table.extras)]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title)}}}",
             r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    previous = None
    for r in table.rows:
        if previous is not None and previous != "method" and r.kind == "method":
            lines.append(r"\midrule")
        previous = r.kind
        cells = []
        for c in table.columns:
            text = _cell(r, c, r" $\pm$ ")
            mark = r.marks.get(c)
            cells.append(rf"\textbf{{{text}}}" if mark == "best" else rf"\underline{{{text}}}" if mark == "second"
                         else text)
        extras = [_num(r.extra.get(e), signed=not e.endswith("%")) for e in table.extras]
        n = [str(r.n) if r.kind == "method" else ""] if show_n else []
        row = " & ".join([_tex(r.label), *n, *cells, *extras]) + r" \\"
        lines.append(re.sub(r"(?<![\w.])([+-])(?=\d)", r"$\1$", row))  # a minus sign, not a hyphen
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


CSV_HEADER = ["table", "row", "kind", "column", "mean", "std", "n", "ci95_low", "ci95_high", "values"]


def csv_rows(table: Table) -> list[list]:
    """Long format, one line per (row, column), in percent; Δ/gain/recovery lines carry the mean only."""
    out = []
    for r in table.rows:
        for c, s in r.cells.items():
            lo, hi = (s.mean - s.ci95, s.mean + s.ci95) if not math.isnan(s.ci95) else ("", "")
            out.append([table.name, r.label, r.kind, c, s.mean, "" if math.isnan(s.std) else s.std, s.n, lo, hi,
                        ";".join(f"{v:g}" for v in s.values)])
        for e, v in r.extra.items():
            out.append([table.name, r.label, r.kind, e, v, "", "", "", "", ""])
    return out


# ---------------------------------------------------------------------------------------------------------------
# MLflow I/O
# ---------------------------------------------------------------------------------------------------------------

def connect(uri: str):
    """An MlflowClient; refuses a missing SQLite file rather than letting MLflow create an empty store."""
    import mlflow

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ReportError(f"no MLflow database at {uri[len('sqlite:///'):]} (cwd {Path.cwd()}); "
                          "pass --tracking-uri sqlite:///path/to/mlflow.db")
    return mlflow.MlflowClient(tracking_uri=uri)


def _search(client, exp_id: str, filter_string: str = "", order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, max_results=1000, order_by=order_by, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def select_runs(client, experiment: str, parent: str | None = None, sweep: str | None = None,
                all_runs: bool = False):
    """(parent run or None, finished children, descriptions of the skipped ones)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no experiment {experiment!r} in this store; existing: {', '.join(names) or 'none'}")
    if all_runs:
        parent_run = None
        runs = [r for r in _search(client, exp.experiment_id) if r.data.tags.get("sweep") != "true"]
    else:
        if parent:
            try:
                parent_run = client.get_run(parent)
            except Exception as err:  # MlflowException: RESOURCE_DOES_NOT_EXIST
                raise ReportError(f"no run {parent!r} in this store ({type(err).__name__})") from err
            if parent_run.info.experiment_id != exp.experiment_id:
                raise ReportError(f"run {parent} is not in experiment {experiment!r}")
        else:
            parents = _search(client, exp.experiment_id, "tags.sweep = 'true'", ["attributes.start_time DESC"])
            parents = [r for r in parents if sweep is None or r.info.run_name == sweep]
            if not parents:
                what = f"named {sweep!r}" if sweep else "(single jobs are not nested under a sweep)"
                raise ReportError(f"no sweep parent run {what} in experiment {experiment!r}: pass --all to report "
                                  "every finished run of the experiment, or --parent RUN_ID")
            parent_run = parents[0]
        runs = _search(client, exp.experiment_id, f"tags.mlflow.parentRunId = '{parent_run.info.run_id}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    runs = sorted(runs, key=lambda r: r.info.run_name or "")
    skipped = [f"{r.info.run_name} ({r.info.status}" + (f": {r.data.tags['error'][:120]}" if "error" in r.data.tags
                                                         else "") + ")" for r in runs if r.info.status != "FINISHED"]
    if not finished:
        where = f"sweep {parent_run.info.run_name}" if parent_run else f"experiment {experiment!r}"
        raise ReportError(f"no finished runs in {where}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return parent_run, sorted(finished, key=lambda r: r.info.start_time), skipped


def load_run(client, run, curves: tuple[str, ...]) -> RunData:
    """Final values from the run's latest metrics; histories only for eval/acc/* (step 0) and the curves."""
    hist = {}
    for m in sorted({m for m in run.data.metrics if m.startswith(ACC)} | {m for m in curves if m in run.data.metrics}):
        points: dict[int, tuple[int, float]] = {}
        for p in client.get_metric_history(run.info.run_id, m):  # a resumed run may re-log a step: keep the last
            if p.step not in points or p.timestamp >= points[p.step][0]:
                points[p.step] = (p.timestamp, p.value)
        hist[m] = sorted((s, v) for s, (_, v) in points.items())
    start = {m: h[0][1] for m, h in hist.items() if m.startswith(ACC) and h and h[0][0] == 0}
    return RunData(run.info.run_name, run.info.run_id, dict(run.data.tags), dict(run.data.params),
                   dict(run.data.metrics), start, {m: hist[m] for m in curves if m in hist})


def _figure():
    """A headless matplotlib figure of the report's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0))


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(groups: list[Group], metric: str, path: Path, smooth: int) -> Path | None:
    """Mean ± std across seeds per row over steps; train/* smoothed; the teacher as a dashed line for eval/acc/*."""
    scale = 100.0 if metric.startswith((ACC, TEACHER)) else 1.0
    window = smooth if metric.startswith("train/") else 1
    fig, ax = _figure()
    drawn = False
    for g in groups:
        hists = [r.curves[metric] for r in g.runs if r.curves.get(metric)]
        if not hists:
            continue
        steps, mean, std = band(hists, window)
        mean, std = [scale * v for v in mean], [scale * v for v in std]
        line, = ax.plot(steps, mean, label=f"{g.label} (n={len(hists)})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if metric.startswith(ACC) and len({g.pair for g in groups}) == 1:
        column = AVG if metric == ACC + "avg" else metric[len(ACC):]
        teacher = [t for g in groups for r in g.runs if (t := teacher_final(r, column)) is not None]
        if teacher:
            ax.axhline(scale * sum(teacher) / len(teacher), color="k", linestyle="--", linewidth=1, label="teacher")
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    return _save(fig, ax, path, "step", metric + (" (%)" if scale == 100.0 else ""),
                 f"{metric}: mean ± std over seeds" + (f" ({window}-step moving average)" if window > 1 else ""))


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def sensitivity_points(groups: list[Group], table: Table, keys: list[str], column: str
                       ) -> dict[str, list[tuple[float, Stat]]] | None:
    """The points of a hyper-parameter sweep: per value of the second row key (or one series), (first key's value,
    the row's `column` Stat) sorted by value. None unless the rows are one or two keys, the first one numeric."""
    if not 1 <= len(keys) <= 2:
        return None
    points: dict[str, list[tuple[float, Stat]]] = {}
    for g in groups:
        x = _number(g.values[keys[0]])
        if x is None:
            return None
        cell = table.row(g.label).cells.get(column)
        if cell is not None:
            series = f"{keys[1]}={g.values[keys[1]]}" if len(keys) == 2 else column
            points.setdefault(series, []).append((x, cell))
    for pts in points.values():
        pts.sort(key=lambda p: p[0])
    return points if points and max(len(p) for p in points.values()) >= 2 else None


def plot_sensitivity(groups: list[Group], table: Table, keys: list[str], column: str, path: Path) -> Path | None:
    """A hyper-parameter sweep as the paper draws Fig. 10: final `column` against the first row key, one line per
    value of the second key, 95% CI bars over seeds, the student's start as a dotted line."""
    points = sensitivity_points(groups, table, keys, column)
    if points is None:
        return None
    fig, ax = _figure()
    for series, pts in points.items():
        ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts],
                    yerr=[0.0 if math.isnan(s.ci95) else s.ci95 for _, s in pts], marker="o", capsize=3,
                    label=f"{series} (n={'-'.join(str(n) for n in sorted({s.n for _, s in pts}))})")
    for row in table.rows:
        if row.kind == "reference" and row.label.startswith("student (start)") and column in row.cells:
            ax.axhline(row.cells[column].mean, color="gray", linestyle=":", linewidth=1, label=row.label)
    return _save(fig, ax, path, keys[0], f"{column} (%)",
                 f"{column} after training against {keys[0]}: mean and 95% CI over seeds")


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


if __name__ == "__main__":
    sys.exit(main())
