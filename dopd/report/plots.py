"""PNG figures: curves over steps (mean ± std over seeds) and hyper-parameter sensitivity plots (the paper's Fig. 10).
matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import math
from pathlib import Path

from dopd.report.runs import ACC, TEACHER
from dopd.report.stats import Stat, band
from dopd.report.tables import AVG, Group, Table, teacher_final


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
