"""MLflow I/O: the store, the sweep's parent and its finished children, and what the report needs from each run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_URI = "sqlite:///outputs/mlflow.db"
ACC = "eval/acc/"
TEACHER = "ref/teacher/acc/"


class ReportError(Exception):
    """A problem the user can fix (wrong experiment, no sweep, nothing finished): printed without a traceback."""


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
