"""MLflow tracking: an embedded SQLite store by default, one parent run per sweep, explicit run names.

Lightning's MLFlowLogger creates one flat run per job with a random name (identical across seeded jobs) and a
file store that current MLflow rejects. Here every job gets a name that says what it is (`dopd-seed1`), tags
that the MLflow UI can filter on, and, in a multirun, the tag `mlflow.parentRunId` of a parent run that
`MLflowSweepCallback` opens before the first job and closes after the last.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from dopd.settings import NOT_A_RESULT

if TYPE_CHECKING:  # mlflow and lightning load in the functions that use them: Hydra imports this module for its
    import mlflow  # sweep callback, and `--help` or a config error should not wait for them
    from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)
PARENT_ENV = "DOPD_MLFLOW_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id"
FAILURES_FILE = "failed_jobs.txt"
SWEEP_KEYS_ENV = "DOPD_SWEEP_KEYS"


def check_tracking_uri(uri: str) -> str:
    """Reject the file store early with a fix, and make sure a SQLite database's folder exists."""
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"logger.tracking_uri={uri!r} is a file store, which current MLflow rejects. Use "
            "logger.tracking_uri=sqlite:///path/to/mlflow.db (the default) or http://host:port for a server."
        )
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create the MLflow database folder {db.parent} ({err}); "
                                  "point logger.tracking_uri at a writable location") from err
        if not os.access(db.parent, os.W_OK):
            raise PermissionError(f"the MLflow database folder {db.parent} is not writable; "
                                  "point logger.tracking_uri at a writable location")
        _init_sqlite_store(uri, db)
    return uri


def _init_sqlite_store(uri: str, db: Path) -> None:
    """Create or migrate the SQLite store under a file lock: MLflow's schema migration is not safe when two
    processes open a new database at once (parallel jobs, several users' first runs)."""
    import fcntl

    import mlflow

    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(tracking_uri=uri)._tracking_client.store  # noqa: B018 (creates the tables)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after an hour of training or minutes of client retries, when a server is unreachable."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise ConnectionError(f"HTTP {resp.status}")
    except (OSError, urllib.error.URLError, ConnectionError) as err:
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({err}). Start it (`mlflow server --host 127.0.0.1 "
            "--port 5000 --backend-store-uri sqlite:///outputs/mlflow.db`), fix logger.tracking_uri, or use the "
            "embedded default (sqlite:///outputs/mlflow.db)."
        ) from err


# Read by MLflow 3.x UIs that choose the experiment page from the experiment's kind; 3.18's UI ignores it and needs
# `?workflowType=machine_learning` (the links below), else it opens on the GenAI "Send your first trace" page.
EXPERIMENT_KIND = "mlflow.experimentKind"
WORKFLOW = "workflowType=machine_learning"
UI_BASE = "http://127.0.0.1:5000"  # what `make ui` serves (the default SQLite store)


def experiment_id(client: mlflow.MlflowClient, name: str, artifact_location: str | None) -> str:
    import mlflow

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location,
                                              tags={EXPERIMENT_KIND: "custom_model_development"})
            return exp_id
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND not in exp.tags:  # made before this tag, or by someone else: training runs all the same
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        except Exception as err:  # noqa: BLE001 (a read-only server: the link's workflowType still works)
            log.debug("could not tag experiment %s: %s", name, err)
    return exp.experiment_id


def ui_base(uri: str) -> str:
    """Where the MLflow UI for this store is: the tracking server itself, else `make ui`'s http://127.0.0.1:5000
    (right for the default store; for another SQLite file, serve it with `mlflow ui --backend-store-uri <uri>`)."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_BASE


def run_link(uri: str, exp_id: str, run_id: str) -> str:
    """The MLflow UI page of one run (the UI routes `#/experiments/<id>/runs/<run id>`), in its model-training mode."""
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}?{WORKFLOW}"


def experiment_link(uri: str, exp_id: str) -> str:
    """The experiment's runs table; `workflowType=machine_learning` skips MLflow 3.x's GenAI 'first trace' page."""
    return f"{ui_base(uri)}/#/experiments/{exp_id}?{WORKFLOW}"


def _serve_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return ""
    default = Path(dopd_root()) / "outputs" / "mlflow.db"
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).resolve() == default.resolve():
        return " (serve it with `make ui`)"
    return f" (serve it with `mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000`)"


def dopd_root() -> str:
    import dopd

    return str(dopd.PROJECT_ROOT)


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parent_run_id() -> str | None:
    """The sweep's parent run, from the environment (basic/joblib launchers) or the sweep folder (submitit)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if str(hc.mode) == "RunMode.MULTIRUN":
            f = Path(hc.sweep.dir) / PARENT_FILE
            if f.exists():
                return f.read_text().strip()
    return None


# Left out of run names: where things go and settings that cannot change a result (dopd.checkpoints.NOT_IN_JOB_KEY)
NOT_IN_RUN_NAME = NOT_A_RESULT


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_name(cfg: DictConfig) -> str:
    """`<router>-seed<seed>`, plus what sets this run apart in its experiment: in a sweep, this job's value of every
    other key the sweep varies (the keys it fixes are on the parent run); alone, every other override that can
    change a result (`dopd-seed1-model=tiny_random,trainer.max_steps=2`; not paths, logger.* or progress bars)."""
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    name = f"{cfg.router.name}-seed{cfg.seed}"
    if not HydraConfig.initialized():
        return name
    overrides = list(HydraConfig.get().overrides.task)
    if in_multirun():
        swept = set(filter(None, os.environ.get(SWEEP_KEYS_ENV, "").split(","))) - {"router", "seed"}
        extra = [o for o in overrides if _key(o) in swept]
    else:
        extra = [o for o in overrides if _key(o) not in ("router", "seed")  # already in the name
                 and not any(_key(o) == x or _key(o).startswith(x + ".") for x in NOT_IN_RUN_NAME)]
    if extra:
        name += "-" + ",".join(extra)
    return name[:250]


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a multirun varies (`a=1,2`, `range(...)`, `choice(...)`, globs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def make_logger(cfg: DictConfig, root: Path) -> MLFlowLogger:

    lc = cfg.logger
    uri = check_tracking_uri(str(lc.tracking_uri))
    tags = {"router": cfg.router.name, "seed": str(cfg.seed), "task": cfg.task.name, "pair": cfg.model.name,
            "git_commit": git_commit(root), "stage": str(cfg.get("stage", "distill"))}
    if HydraConfig.initialized():  # the chosen ablation / experiment files, which the config itself does not name
        choices = HydraConfig.get().runtime.choices
        tags.update({g: str(choices[g]) for g in ("ablation", "experiment") if choices.get(g) not in (None, "null")})
    tags.update({str(k): str(v) for k, v in (lc.get("tags") or {}).items()})
    parent = parent_run_id()
    if parent:
        tags["mlflow.parentRunId"] = parent
    bound_http(uri, lc)
    # the experiment first, so that a new one is tagged as model training (MLFlowLogger would create it untagged)
    experiment_id(mlflow_client(uri), str(lc.experiment), artifact_location(uri, lc))
    logger = _tracked_logger_class()(experiment_name=lc.experiment, run_name=run_name(cfg), tracking_uri=uri, tags=tags,
                          artifact_location=artifact_location(uri, lc), log_model=False, run_id=lc.get("run_id"))
    _job_logger[:] = [logger]  # for the link printed at the end of the job (MLflowSweepCallback.on_job_end)
    return logger


_job_logger: list = []  # this process's current job's MLFlowLogger

# What a tracking server that goes away may cost a job: MLflow's own defaults retry each call for about 4 minutes
# (7 retries, backoff factor 2, 120 s timeout), and a job makes several calls on its way out.
HTTP_SETTINGS = {"http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "http_timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"}
HTTP_DEFAULTS = {"http_max_retries": 2, "http_timeout": 10, "http_backoff_factor": 1}


def bound_http(uri: str, lc: DictConfig) -> None:
    """For a tracking server, bound MLflow's retries and timeout (logger.http_*; null: MLflow's default or the
    environment's), so that a server that stops answering ends the job in seconds, not after many minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    for key, env in HTTP_SETTINGS.items():
        value = lc.get(key, HTTP_DEFAULTS[key])
        if value is not None:
            os.environ[env] = str(int(value))


class TrackingServerLost(ConnectionError):
    """The tracking server stopped answering during a job (after MLflow's bounded retries)."""

    def __init__(self, uri: str, err: BaseException):
        detail = str(err).replace("\n", " ")
        super().__init__(
            f"MLflow tracking server {uri} stopped answering during the job ({detail[:300]}); the job stops. "
            "Its last checkpoint is kept: once the server is back, rerun the same command with resume=true to "
            "continue it.")


def _is_connection_failure(err: BaseException) -> bool:
    """An MLflow error that says the server did not answer (refused, reset, timed out, 5xx after retries)."""
    import requests

    seen = set()
    e = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.RetryError)):
            return True
        e = e.__cause__ or e.__context__
    text = str(err)
    return text.startswith("API request to") and ("failed with exception" in text or "timeout" in text)


_tracking_calls = [0]  # > 0 while this process waits on an MLflow call of a job's logger (see _on_signal)


class _ServerClient:
    """The logger's MlflowClient, guarded: a call that finds the server gone raises TrackingServerLost once; after
    that, calls return None at once (the run cannot be marked any more; waiting again would only delay the exit)."""

    def __init__(self, client, logger):
        self._client, self._logger = client, logger

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self._logger.server_lost:
                return None
            _tracking_calls[0] += 1
            try:
                return attr(*args, **kwargs)
            except Interrupted:  # a signal during a slow call: spend little more time on the server on the way out
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
                raise
            except Exception as err:
                if not _is_connection_failure(err):
                    raise
                self._logger.server_lost = True
                lost = TrackingServerLost(self._logger._tracking_uri, err)
                log.error("%s", lost)
                raise lost from err
            finally:
                _tracking_calls[0] -= 1

        return call


def _tracked_logger_class():
    from lightning.pytorch.loggers import MLFlowLogger

    class TrackedMLFlowLogger(MLFlowLogger):
        """MLFlowLogger whose calls to a tracking server that went away end the job with one clear error."""

        server_lost = False

        @property
        def experiment(self):
            client = super().experiment
            if not self._tracking_uri.startswith(("http://", "https://")) or not hasattr(client, "log_batch"):
                return client
            return _ServerClient(client, self)

        def finalize(self, status: str = "success") -> None:
            if not self.server_lost:
                super().finalize(status)

    return TrackedMLFlowLogger


def mlflow_client(uri: str) -> mlflow.MlflowClient:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def print_job_link() -> None:
    """`MLflow run <name>: <link>` for the job that just ended in this process, if it opened a run."""
    logger = _job_logger.pop() if _job_logger else None
    run_id, exp_id = getattr(logger, "_run_id", None), getattr(logger, "_experiment_id", None)
    if not run_id or getattr(logger, "server_lost", False):  # no run opened (a config error), or no server: no link
        return
    uri = logger._tracking_uri
    try:
        run = mlflow_client(uri).get_run(run_id)
        exp_id, name = run.info.experiment_id, run.info.run_name
    except Exception as err:  # noqa: BLE001 (a link is a courtesy: never fail a job for it)
        log.debug("no MLflow link: %s", err)
        if not exp_id:
            return
        name = run_id
    hint = "" if in_multirun() else _serve_hint(uri)  # a sweep says it once, at its end
    print(f"MLflow run {name}: {run_link(uri, exp_id, run_id)}{hint}", flush=True)


def artifact_location(uri: str, lc: DictConfig) -> str | None:
    """Beside the SQLite file for the embedded store; a tracking server keeps (and proxies) its own artifacts."""
    return lc.get("artifact_location") if uri.startswith("sqlite:") else None


def sweep_overrides(config: DictConfig) -> list[str]:
    """What the sweep varies: the config's `hydra.sweeper.params` (experiment configs), then the command line,
    which wins for a key it repeats (as in Hydra's BasicSweeper)."""
    merged = {f"{k}": f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    for override in config.hydra.overrides.task:
        merged[override.split("=", 1)[0].lstrip("+~")] = override
    return list(merged.values())


def sweep_values(overrides: list[str]) -> dict[str, list[str]]:
    """{swept key: its values} (`router=vanilla,dopd` -> ["vanilla", "dopd"]; a glob's values: [])."""
    from dopd.report import sweep_overrides as parse

    return parse(" ".join(overrides))


def sweep_description(overrides: list[str], swept: dict[str, list[str]], name: str) -> str:
    """The parent run's description (`mlflow.note.content`, Markdown): the command and what its children are."""
    fixed = [o for o in overrides if _key(o) not in swept]
    sizes = [len(v) for v in swept.values()]
    jobs = math.prod(sizes) if sizes and all(sizes) else None
    lines = [f"**Sweep `{name}`**: `python train.py -m {' '.join(overrides)}`", ""]
    if swept:
        lines.append(f"Children: {jobs if jobs is not None else 'one'} job{'s' if jobs != 1 else ''}, one per "
                     "combination of " + " × ".join(f"`{k}` ∈ {{{', '.join(v) or '…'}}}" for k, v in swept.items())
                     + " (each named `<router>-seed<seed>` plus its other swept values).")
    if fixed:
        lines.append("Fixed for every child: " + " ".join(f"`{o}`" for o in fixed) + ".")
    lines.append("At the end: `summary/...` metrics and `summary.md`, the mean ± std over seeds of each group's "
                 "final `eval/acc/*` (groups: the swept keys other than seed).")
    return "\n".join(lines)


def _label_part(text: str) -> str:
    """A metric-name-safe piece: MLflow allows letters, digits, `_ - . / : ` and spaces, no `=` or `,`."""
    return re.sub(r"[^\w.\-]", "_", str(text))


def summarize_sweep(client, parent_id: str, experiment: str) -> str | None:
    """Log on the parent run, per group of its children (the swept keys other than seed), the mean, std and n over
    seeds of each final `eval/acc/*` (`summary/router:dopd/eval/acc/avg/mean`), and the Markdown table
    `summary.md` (dopd.report's table: % over seeds, with the teacher and student-start rows when logged).
    Returns the table, or None when no child finished."""
    import tempfile

    from mlflow.entities import Metric

    from dopd import report as rp

    try:
        parent, finished, skipped = rp.select_runs(client, experiment, parent=parent_id)
    except rp.ReportError as err:
        log.warning("no sweep summary: %s", err)
        return None
    runs = [rp.load_run(client, r, ()) for r in finished]
    swept = rp.sweep_overrides(parent.data.tags.get("overrides", ""))
    keys = [k for k in swept if k != "seed"]
    groups = rp.group_runs(runs, keys, swept)
    now = int(time.time() * 1000)
    metrics = []
    for g in groups:
        label = "/".join(f"{_label_part(k)}:{_label_part(v)}" for k, v in g.values.items()) or "all"
        for m in sorted({m for r in g.runs for m in r.final if m.startswith(rp.ACC)}):
            stat = rp.summarize([r.final.get(m) for r in g.runs])
            for what, value in (("mean", stat.mean), ("std", stat.std), ("n", stat.n)):
                if not math.isnan(value):
                    metrics.append(Metric(f"summary/{label}/{m}/{what}", float(value), now, 0))
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(parent_id, metrics=metrics[i:i + 1000])
    columns = rp.split_columns({m for r in runs for m in r.final})
    columns += [rp.AVG] if any(rp.ACC + "avg" in r.final for r in runs) else []
    if not columns:
        log.warning("no sweep summary: the finished children logged no %s* metric", rp.ACC)
        return None
    table = rp.build_table(groups, columns, f"{experiment}: sweep `{parent.info.run_name}`")
    table.note = (f"{len(runs)} finished child run(s) in {len(groups)} group(s)"
                  + (f" by {', '.join(keys)}" if keys else "") + "; final-step accuracy without p in %, mean ± std "
                  "over seeds." + (f" Skipped: {', '.join(skipped)}." if skipped else ""))
    markdown = rp.to_markdown(table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "summary.md"
        path.write_text(markdown)
        client.log_artifact(parent_id, str(path))
    return markdown


def same_sweep_key(overrides: list[str]) -> list[str]:
    """What makes two launches the same sweep: their overrides less those that change no result (resume, logger.*,
    paths.*, ...: dopd.settings.NOT_A_RESULT)."""
    return sorted(o for o in overrides
                  if not any(_key(o) == x or _key(o).startswith(x + ".") for x in NOT_A_RESULT))


def earlier_parent(client, config: DictConfig, overrides: list[str]):
    """For a sweep relaunched with resume=true: the parent run of the newest earlier launch of the same sweep into
    this output folder (its `<sweep dir>/mlflow_parent_run_id`), whose jobs resume=true continues; else None."""
    want = same_sweep_key(overrides)
    here = Path(config.hydra.sweep.dir).resolve()
    files = sorted(Path(config.paths.output_dir).glob(f"multiruns/*/{PARENT_FILE}"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    for f in files:
        if f.parent.resolve() == here:
            continue
        try:
            run = client.get_run(f.read_text().strip())
        except Exception as err:  # noqa: BLE001 (deleted, or from another store: not this sweep's)
            log.debug("sweep parent in %s: %s", f, err)
            continue
        if (run.info.experiment_id == client.get_experiment_by_name(str(config.logger.experiment)).experiment_id
                and same_sweep_key(run.data.tags.get("overrides", "").split()) == want):
            return run
    return None


class MLflowSweepCallback(Callback):
    """Opens a parent run before a multirun's first job and closes it after the last, with the sweep's summary;
    prints the MLflow link of every job and of the sweep."""

    def _open(self, config: DictConfig) -> None:
        import mlflow
        from mlflow.entities import Param

        lc = config.logger
        uri = check_tracking_uri(str(lc.tracking_uri))
        bound_http(uri, lc)
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = experiment_id(client, lc.experiment, artifact_location(uri, lc))
        overrides = sweep_overrides(config)
        swept = sweep_values(overrides)
        sweep_dir = Path(config.hydra.sweep.dir)
        earlier = earlier_parent(client, config, overrides) if config.get("resume") is True else None
        if earlier is not None:  # a relaunch with resume=true: its resumed jobs' runs are the earlier parent's children
            client.update_run(earlier.info.run_id, status="RUNNING")
            if "failed_jobs" in earlier.data.tags:  # from the launch that stopped; this one counts its own
                client.delete_tag(earlier.info.run_id, "failed_jobs")
            self._remember(config, client, earlier, uri, exp, overrides, sweep_dir)
            log.info("resume=true: continuing the sweep %s under its MLflow parent run %s", earlier.info.run_name,
                     earlier.info.run_id)
            return
        name = lc.get("sweep_name") or f"sweep-{time.strftime('%m%d-%H%M%S')}"  # fits the UI's name column
        run = client.create_run(exp, run_name=name, tags={
            "sweep": "true", "overrides": " ".join(overrides)[:5000],
            "git_commit": git_commit(Path(config.paths.root)),
            "mlflow.note.content": sweep_description(overrides, swept, name)[:5000]})
        params = [Param(f"sweep/{k}", (",".join(v) or next(o for o in overrides if _key(o) == k).split("=", 1)[1])
                        [:5000]) for k, v in swept.items()]
        if params:
            client.log_batch(run.info.run_id, params=params)
        self._remember(config, client, run, uri, exp, overrides, sweep_dir)
        log.info("MLflow parent run %s (%s) for this sweep", name, run.info.run_id)

    def _remember(self, config, client, run, uri, exp, overrides, sweep_dir: Path) -> None:
        self.client, self.run_id, self.uri, self.exp_id = client, run.info.run_id, uri, exp
        self.experiment, self.name = str(config.logger.experiment), run.info.run_name
        os.environ[PARENT_ENV] = run.info.run_id
        os.environ[SWEEP_KEYS_ENV] = ",".join(swept_keys(overrides))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        _job_logger.clear()

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        print_job_link()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        catch_signals()  # a signal between jobs must also reach Python code, so that the parent run gets closed
        self._sweep_dir = Path(config.hydra.sweep.dir)
        self._open(config)
        atexit.register(self._close_if_open)  # Hydra skips on_multirun_end when a job's exception ends the sweep

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failures = self._failures()
        summary, run_id = None, getattr(self, "run_id", None)
        if run_id:
            try:
                summary = summarize_sweep(self.client, self.run_id, self.experiment)
            except Exception as err:  # noqa: BLE001 (the runs are all logged; only the summary is missing)
                log.error("could not summarize the sweep on its MLflow parent run: %s", err)
        self._close("FAILED" if failures else "FINISHED", failures)
        if summary:
            print("\n" + summary, flush=True)
        if run_id:
            print(f"MLflow sweep {self.name}: {run_link(self.uri, self.exp_id, run_id)}\n"
                  f"MLflow runs of experiment {self.experiment}: {experiment_link(self.uri, self.exp_id)}"
                  f"{_serve_hint(self.uri)}", flush=True)
        if failures:
            log.error("%d job(s) of this sweep failed (their MLflow runs are marked FAILED or KILLED):\n  %s",
                      len(failures), "\n  ".join(failures))
            raise SystemExit(1)

    def _failures(self) -> list[str]:
        f = self._sweep_dir / FAILURES_FILE
        return f.read_text().strip().splitlines() if f.exists() else []

    def _close(self, status: str, failures: list[str]) -> None:
        if getattr(self, "run_id", None):
            if failures:
                self.client.set_tag(self.run_id, "failed_jobs", str(len(failures)))
            self.client.set_terminated(self.run_id, status)
            self.run_id = None
            os.environ.pop(PARENT_ENV, None)
            os.environ.pop(SWEEP_KEYS_ENV, None)

    def _close_if_open(self) -> None:
        """At exit of a sweep that did not reach its end: KILLED after a signal, else FAILED; never left RUNNING."""
        if getattr(self, "run_id", None):
            status = "KILLED" if _received else "FAILED"
            try:
                self._close(status, self._failures())
                log.error("the sweep stopped early; its MLflow parent run is marked %s", status)
            except Exception as err:  # noqa: BLE001 (at exit: report, do not mask the original error)
                log.error("could not mark the sweep's MLflow parent run %s: %s", status, err)


class Interrupted(SystemExit):
    """A job or sweep stopped by a signal; the process exits with 128 + its number, as a shell reports a kill."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


_received: list[int] = []  # the signals this process has caught


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signal.getsignal(signum) is not _on_signal and not _tracking_calls[0]:  # called from Lightning's SIGTERM
        return  # handler inside trainer.fit: Lightning stops after the current step (SIGTERMException); but not while
    # the step waits on a slow tracking server (retries, timeouts): then the signal interrupts that call at once
    raise Interrupted(signum)


def catch_signals() -> None:
    """SIGTERM raises `Interrupted` (and SIGINT KeyboardInterrupt) instead of killing the process before it can mark
    its MLflow runs; inside trainer.fit, Lightning's own SIGTERM handler runs first and calls this one."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)


def received_signal() -> int | None:
    """The last SIGTERM/SIGINT this process caught, if any (train.py: one that came as a sweep job ended)."""
    return _received[-1] if _received else None


def interrupt_signal(err: BaseException | None) -> int | None:
    """The signal behind an exception, if it is an interruption: `Interrupted`, Lightning's SIGTERMException (a
    SystemExit without code) or KeyboardInterrupt, which Lightning turns into sys.exit(1) (then its context)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, Interrupted):
            return err.signum
        if isinstance(err, KeyboardInterrupt):
            return int(signal.SIGINT)
        if any(c.__name__ == "SIGTERMException" for c in type(err).__mro__):
            return int(signal.SIGTERM)
        err = err.__cause__ or err.__context__
    return None


def describe_failure(err: BaseException) -> tuple[str, str]:
    """(MLflow status, one-line description) of the exception that ended a job."""
    sig = interrupt_signal(err)
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    if sig is None:
        return "FAILED", text
    return "KILLED", f"killed by {signal.Signals(sig).name} ({text.rstrip(': ')})"


def in_multirun() -> bool:
    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def record_failure(cfg: DictConfig, err: BaseException) -> bool:
    """In a multirun, note a failed or killed job in the sweep folder and return True; else False. After a failure
    the sweep goes on (unless continue_on_error=false: then False); after a signal the caller stops it."""
    if not in_multirun():
        return False
    killed = interrupt_signal(err) is not None
    if not (killed or cfg.get("continue_on_error", True)):
        return False
    hc = HydraConfig.get()
    _, text = describe_failure(err)
    if killed:
        log.error("job %s %s; the sweep stops", hc.job.num, text)
    else:
        log.exception("job %s failed; the sweep continues", hc.job.num)
    line = f"job {hc.job.num} ({' '.join(hc.overrides.task)}): {text}".replace("\n", " ")
    with open(Path(hc.sweep.dir) / FAILURES_FILE, "a") as f:  # appends are atomic for short lines
        f.write(line[:2000] + "\n")
    return True


def log_config(logger: MLFlowLogger, cfg: DictConfig, out_dir: Path) -> None:
    """Params: the flattened resolved config; artifact: the resolved YAML."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # tests compose with Hydra's own node
    logger.log_hyperparams(OmegaConf.to_container(job, resolve=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(job, resolve=True))
    logger.experiment.log_artifact(logger.run_id, str(path))
