"""From a composed Hydra config to a finished run: build everything, train, evaluate, log. Called by train.py."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from dopd.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    JobStamp,
    job_settings,
    previous_path,
    resumable_checkpoint,
    settings_key,
)
from dopd.build import build_router, build_task, build_view, compose_config  # noqa: F401 (re-exported)
from dopd.data import PromptDataModule
from dopd.models import load_pair
from dopd.module import DistillModule
from dopd.progress import console_callbacks, quiet_libraries
from dopd.routing import RouterSpec
from dopd.settings import check_all
from dopd.tracking import log_config, make_logger

log = logging.getLogger(__name__)
# Expected here: the frozen teacher is in eval mode (DistillModule.on_train_start puts the student in training mode),
# and batches are text that the module moves itself.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")
# Checkpoints hold the state after the step's optimizer update, which is what a resume continues from.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
JOB_FILE = "job.json"


def world_size(trainer: DictConfig) -> int | None:
    """Processes the trainer config asks for (devices x num_nodes), or None where Lightning decides ("auto")."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    n = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    return n * int(trainer.get("num_nodes", 1)) if isinstance(n, int) and n > 0 else None


def check_step_sizes(cfg: DictConfig) -> None:
    """One optimizer step's sizes, in one line each before any model loads: data.batch_size prompts over the
    processes, x rollout.n rows each; generation calls (rollout.batch_size) and loss micro-batches
    (optim.micro_batch_size) cut a process's rows into whole prompts."""
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate}: one batch is one optimizer step here; set "
                         f"data.batch_size to the step's prompts and optim.micro_batch_size to the rows per loss "
                         f"micro-batch (e.g. data.batch_size={cfg.data.batch_size * accumulate} "
                         f"optim.micro_batch_size={cfg.data.batch_size * cfg.rollout.n})")
    prompts, n, world = int(cfg.data.batch_size), int(cfg.rollout.n), world_size(cfg.trainer) or 1
    if prompts <= 0 or n <= 0:
        raise ValueError(f"data.batch_size={prompts} and rollout.n={n} must be > 0")
    if prompts % world:
        raise ValueError(f"data.batch_size={prompts} must be divisible by the {world} processes "
                         f"(e.g. data.batch_size={max(world, prompts - prompts % world)})")
    rows = prompts // world * n
    for key, value in (("rollout.batch_size", cfg.rollout.get("batch_size")),
                       ("optim.micro_batch_size", cfg.optim.get("micro_batch_size"))):
        if value is None:
            continue
        valid = [k for k in range(n, rows + 1, n) if rows % k == 0]
        if not isinstance(value, int) or value not in valid:
            raise ValueError(f"{key}={value!r} must be a whole number of prompts' rollouts that divides a process's "
                             f"{rows} rows per step ({prompts // world} prompts x rollout.n={n}): one of {valid}, "
                             "or null")


def build_strategy(spec):
    """`trainer.strategy` is a Lightning name ("ddp") or a {_target_: ...} mapping; class paths in lists (wrap
    policies) are imported."""
    if not isinstance(spec, dict):
        return spec
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = {hydra.utils.get_class(path) for path in kwargs[key]}
    return hydra.utils.get_class(spec["_target_"])(**kwargs)


def run_dir() -> Path:
    """The job's output folder (Hydra's run or sweep subdir; the run dir when composed without a launch)."""
    if not HydraConfig.initialized():
        return Path.cwd()
    hc = HydraConfig.get()
    if not OmegaConf.is_missing(hc.runtime, "output_dir"):
        return Path(hc.runtime.output_dir)
    return Path(hc.run.dir)


def job_key(cfg: DictConfig) -> str:
    """Identifies 'the same job' across launches: the hash of its resolved config without the settings that cannot
    change its weights or metrics (dopd.checkpoints.NOT_IN_JOB_KEY: resume, logger, hydra, paths, progress bars...)."""
    return settings_key(job_settings(cfg))


def write_job_file(cfg: DictConfig, out: Path, mlflow_run_id: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JOB_FILE).write_text(json.dumps({"key": job_key(cfg), "mlflow_run_id": mlflow_run_id,
                                            "tracking_uri": str(cfg.logger.tracking_uri)}))


def find_resumable(cfg: DictConfig) -> dict | None:
    """`resume=true`: the newest earlier run of this exact job with a last.ckpt; `resume=<run dir>`: that one."""
    out = Path(cfg.paths.output_dir)
    settings = job_settings(cfg)
    key = settings_key(settings)

    def has_checkpoint(folder: Path) -> bool:
        last = folder / "checkpoints" / LAST
        return last.exists() or previous_path(last).exists()

    if cfg.resume is True:
        candidates = sorted((*out.glob(f"runs/*/{JOB_FILE}"), *out.glob(f"multiruns/*/*/{JOB_FILE}")),
                            key=lambda p: p.stat().st_mtime, reverse=True)
        for job_file in candidates:
            info = json.loads(job_file.read_text())
            if info["key"] == key and has_checkpoint(job_file.parent):
                # the checkpoint itself must be whole and this job's (job.json alone can be another job's)
                ckpt = resumable_checkpoint(job_file.parent, key, settings)
                return {**info, "dir": str(job_file.parent), "ckpt": str(ckpt)}
        log.warning("resume=true: no earlier run of this job with a checkpoint under %s; starting fresh", out)
        return None
    folder = Path(str(cfg.resume))
    job_file = folder / JOB_FILE
    if not (job_file.exists() and has_checkpoint(folder)):
        raise FileNotFoundError(f"resume={folder}: expected {JOB_FILE} and checkpoints/last.ckpt there; "
                                "pass a run folder of an earlier job, or resume=true to find it")
    ckpt = resumable_checkpoint(folder, key, settings)
    return {**json.loads(job_file.read_text()), "dir": str(folder), "ckpt": str(ckpt)}


def run(cfg: DictConfig) -> float:
    """Train one job; returns the final held-out accuracy averaged over evaluation splits (for sweepers).

    The MLflow run is opened first (an unreachable tracking server fails here, before any model is loaded); any
    later error marks it FAILED with the error as the tag `error`, then propagates.
    """
    quiet_libraries(verbose=bool(cfg.get("verbose", False)))  # before any library prints (dopd.progress)
    root = Path(cfg.paths.root)
    if cfg.get("stage", "distill") == "sft":
        from dopd.zoo import build

        card = build(cfg, root)
        return float(card["accuracy"].get("acc/avg", float("nan")))
    if cfg.get("stage", "distill") != "distill":
        raise ValueError(f"stage={cfg.stage!r} is not one of distill, sft")
    check_all(cfg)  # every data/rollout/optim/eval value, then the router and the step's sizes: before MLflow
    router = build_router(cfg.router)  # or any model
    check_step_sizes(cfg)
    previous = find_resumable(cfg) if cfg.get("resume") else None
    if previous is not None:
        cfg.logger.run_id = previous["mlflow_run_id"]
        log.info("resuming %s from %s (MLflow run %s)", previous["dir"], previous["ckpt"], previous["mlflow_run_id"])
    logger = make_logger(cfg, root)
    run_id = logger.run_id  # creates the run now
    try:
        return _train(cfg, root, router, logger, previous)
    except BaseException as err:
        # KILLED for SIGTERM/Ctrl-C, however Lightning re-raised them
        from dopd.tracking import describe_failure

        status, error = describe_failure(err)
        logger.experiment.set_tag(run_id, "error", error[:5000])
        logger.finalize(status)
        raise


def _train(cfg: DictConfig, root: Path, router: RouterSpec, logger, previous: dict | None = None) -> float:
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    task = build_task(cfg.task)
    pair = load_pair(OmegaConf.to_container(cfg.model, resolve=True), root=root)
    view = build_view(cfg, pair.tokenizer, pair.processor)
    data = PromptDataModule(task, batch_size=cfg.data.batch_size, n_train=cfg.data.n_train, n_eval=cfg.data.n_eval,
                            seed=cfg.seed, data_seed=cfg.data.seed)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # The module clips in its own optimizer step (training_step: one step over the step's micro-batches).
    clip = trainer_kwargs.pop("gradient_clip_val", None)
    module = DistillModule(pair.student, pair.teacher, view, router, task, rollout=cfg.rollout, optim=cfg.optim,
                           eval=cfg.eval, checkpoint_teacher=cfg.checkpoint_teacher, gradient_clip_val=clip)
    out = Path(previous["dir"]) if previous else run_dir()
    if previous is None:  # a resumed run already has its params; MLflow refuses to change them
        log_config(logger, cfg, out)
    write_job_file(cfg, out, logger.run_id)
    # no version counter: a resumed run must write last.ckpt again, not last-v1.ckpt beside a stale last.ckpt
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, enable_version_counter=False,
                           every_n_train_steps=cfg.get("checkpoint_every", 50))
    settings = job_settings(cfg)  # stamped into every checkpoint; written atomically by AtomicCheckpointIO
    trainer_kwargs["strategy"] = build_strategy(trainer_kwargs.get("strategy", "auto"))
    trainer_kwargs["plugins"] = [*(trainer_kwargs.get("plugins") or []), AtomicCheckpointIO()]
    callbacks = [ckpt, JobStamp(settings_key(settings), settings),
                 *(hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values())]
    # a bar of optimizer steps with the last loss and eval/acc/avg, and one line per evaluation (dopd.progress)
    callbacks += console_callbacks(cfg, progress_bar=trainer_kwargs.get("enable_progress_bar", True))
    trainer = L.Trainer(**trainer_kwargs, logger=logger, callbacks=callbacks, default_root_dir=str(out))
    log.info("router=%s passes=%s pair=%s task=%s -> %s", router.name, sorted(router.passes), pair.name, task.name, out)
    trainer.fit(module, datamodule=data, ckpt_path=previous["ckpt"] if previous else None)
    if cfg.get("export_student") and trainer.is_global_zero:  # a later stage loads it: model.student.path=<out>/student
        pair.student.save_pretrained(out / "student")
        (pair.processor or pair.tokenizer).save_pretrained(out / "student")
        log.info("student exported to %s", out / "student")
    final = getattr(module, "last_eval", {})
    log.info("final evaluation: %s", {k: round(v, 4) for k, v in final.items()})
    return float(final.get("eval/acc/avg", float("nan")))
