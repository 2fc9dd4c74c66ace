"""Checkpoints that survive a full disk or a kill mid-write, and that say which job wrote them.

Lightning's default writer serialises into memory, lets fsspec write a temporary file in the system temp directory
and then *moves* it into place: when outputs/ is on another filesystem than /tmp that move is a plain copy, so a full
disk or a kill leaves a truncated last.ckpt, the only one kept, and resume fails with a bare EOFError. Here the
temporary file lies beside its destination, is fsynced, then renamed over it (atomic within one filesystem), and the
checkpoint it replaces stays as last-prev.ckpt until the next write, so resume always has a whole one to fall back on.

Every checkpoint also carries its job's key and settings (`JobStamp`), so resuming from a checkpoint that another
job wrote (two launches that once shared a folder, `resume=<folder>` of a different job) is refused, naming both.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from dopd.settings import NOT_A_RESULT

log = logging.getLogger(__name__)
JOB_ENTRY = "dopd_job"  # the checkpoint's {"key", "settings"}
LAST = "last.ckpt"
# Settings that cannot change the trained weights or the logged metrics: a resume with other values is the same job.
# (num_threads can change the last bit of CPU float reductions; it is still treated as cosmetic.)
NOT_IN_JOB_KEY = NOT_A_RESULT


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, bad CRC, not a torch file)."""


class JobMismatchError(ValueError):
    """Resuming would continue one job from another job's weights."""


# -- the job key ------------------------------------------------------------------------------------------------------
def job_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat `a.b.c -> value`, without NOT_IN_JOB_KEY; paths.root/output_dir stand as
    placeholders, so moving the project or the outputs folder keeps the key."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_readonly(job, False)
    OmegaConf.set_struct(job, False)
    if "paths" in job:
        job.paths.root, job.paths.output_dir = "<root>", "<output_dir>"
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1]
            if not any(key == x or key.startswith(x + ".") for x in NOT_IN_JOB_KEY):
                flat[key] = node

    walk(OmegaConf.to_container(job, resolve=True), "")
    return flat


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(theirs: dict, ours: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "<unset>") != ours.get(k, "<unset>"))
    parts = [f"{k} ({json.dumps(theirs.get(k, '<unset>'), default=str)} there, "
             f"{json.dumps(ours.get(k, '<unset>'), default=str)} here)" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_job(path: Path | str, stamp: dict | None, key: str, settings: dict) -> None:
    """Refuse a checkpoint stamped by another job; accept (with a warning) one written before stamps existed."""
    if not stamp:
        log.warning("%s names no job (written before checkpoints carried their job key); cannot check that it is "
                    "this job's", path)
        return
    if stamp.get("key") != key:
        diff = _differences(stamp.get("settings") or {}, settings)
        raise JobMismatchError(
            f"resume: {path} was written by job {stamp.get('key')}, not by this job {key} (they differ in "
            f"{diff or 'settings not recorded'}); rerun with that job's settings to continue it, resume=false to "
            "start this job fresh, or resume=<folder> of a run of this job")


class JobStamp(Callback):
    """Writes the job key and settings into every checkpoint; refuses to load one stamped by another job."""

    def __init__(self, key: str, settings: dict[str, Any]):
        self.key, self.settings = key, settings

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[JOB_ENTRY] = {"key": self.key, "settings": self.settings}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        check_job("the checkpoint being loaded", checkpoint.get(JOB_ENTRY), self.key, self.settings)


# -- writing ------------------------------------------------------------------------------------------------------------
def previous_path(path: Path | str) -> Path:
    """Where the checkpoint that `path` replaced is kept: last.ckpt -> last-prev.ckpt."""
    p = Path(path)
    return p.with_name(f"{p.stem}-prev{p.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    """Keep `path` as its previous_path while the new file takes its name (a hard link: `path` never vanishes)."""
    prev = previous_path(path)
    link = prev.with_name(f".{prev.name}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, prev)
    except OSError:  # no hard links here: rename (resume falls back to prev if killed before the next rename)
        os.replace(path, prev)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the destination, fsync, keep the old checkpoint, os.replace."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-way
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            kept = f"{path} (the previous checkpoint) is unchanged" if path.exists() else "no checkpoint was kept"
            raise OSError(err.errno, f"could not write checkpoint {path} ({os.strerror(err.errno or errno.EIO)}); "
                                     f"{kept}; free space or fix the folder, then resume=true") from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


# -- reading on resume --------------------------------------------------------------------------------------------------
def inspect_checkpoint(path: Path | str) -> dict:
    """{"global_step", "stamp"} of a whole checkpoint; CorruptCheckpointError (with the cause) for any other.

    The zip CRCs are checked (reads the file once, no unpickling of tensors); the pickle is loaded memory-mapped."""
    path = Path(path)
    if path.is_dir():  # a sharded (FSDP) checkpoint: a folder Lightning reads itself
        return {"global_step": None, "stamp": None}
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            raise CorruptCheckpointError(f"entry {bad} fails its CRC check")
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except CorruptCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001  (BadZipFile when truncated, EOFError, PytorchStreamReader errors...)
        size = path.stat().st_size if path.exists() else 0
        raise CorruptCheckpointError(f"{type(err).__name__}: {err}; {size} bytes, truncated?".replace("\n", " "))
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    return {"global_step": ckpt.get("global_step"), "stamp": ckpt.get(JOB_ENTRY)}


def resumable_checkpoint(folder: Path | str, key: str, settings: dict[str, Any]) -> Path:
    """The checkpoint of run `folder` to resume from: last.ckpt, or last-prev.ckpt (logged) when last.ckpt is
    missing or unreadable. Raises a one-line CorruptCheckpointError when neither is whole, JobMismatchError when
    the checkpoint belongs to another job."""
    last = Path(folder) / "checkpoints" / LAST
    prev = previous_path(last)
    problems = []
    for path in (last, prev):
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        try:
            info = inspect_checkpoint(path)
        except CorruptCheckpointError as err:
            problems.append(f"{path} is unreadable ({err})")
            continue
        check_job(path, info["stamp"], key, settings)
        if path != last:
            log.warning("resume: %s; resuming from the previous checkpoint %s (step %s) instead",
                        problems[0], path, info["global_step"])
        return path
    raise CorruptCheckpointError(f"resume: cannot continue {folder}: {problems[0]}, and {problems[1]}; start fresh "
                                 "with resume=false, or resume=<another run folder>")
