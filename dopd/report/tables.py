"""The pure part of the report: the swept keys, rows (groups of runs), tables with their reference rows and
Δ / gain / gap-recovered columns, and their layout as Markdown, LaTeX and CSV."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field

from dopd.report.runs import ACC, TEACHER, ReportError, RunData
from dopd.report.stats import Stat, summarize

SPLIT_ORDER = ("id", "test", "val", "ood")  # then the others alphabetically, Avg last
AVG = "Avg"


# ---------------------------------------------------------------------------------------------------------------
# Swept keys and rows
# ---------------------------------------------------------------------------------------------------------------

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

