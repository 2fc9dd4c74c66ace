"""Checkpoints and run folders: unique folders per launch, atomic writes that keep the previous checkpoint, a clear
line for a corrupt one, and no resuming one job from another job's weights."""

from __future__ import annotations

import errno
import io
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dopd
from dopd.checkpoints import CorruptCheckpointError, JobMismatchError, inspect_checkpoint, previous_path
from dopd.pipeline import find_resumable, job_key, run
from tests.conftest import CONF, FAST, compose_cfg

JOB = [*FAST, "checkpoint_every=1"]


def _job(tmp: Path, *extra: str):
    return compose_cfg([*JOB, f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", *extra], tmp)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished 2-step job with a checkpoint at each step (last.ckpt = step 2, last-prev.ckpt = step 1)."""
    out = tmp_path_factory.mktemp("finished")
    run(_job(out))
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(finished, dst)
    return dst


def test_job_key_ignores_settings_that_cannot_change_the_weights(tmp_path):
    """A progress bar, thread count or a moved project must not make `resume=true` silently start fresh."""
    base = job_key(compose_cfg([*FAST, "task=jsonl"], tmp_path))
    for cosmetic in (["rich_progress=true"], ["num_threads=2"], ["paths.root=/elsewhere/dopd"],
                     ["paths.output_dir=/elsewhere/out"], ["checkpoint_every=7"], ["export_student=true"],
                     ["continue_on_error=false"], ["logger.run_name=x"]):
        assert job_key(compose_cfg([*FAST, "task=jsonl", *cosmetic], tmp_path)) == base, cosmetic
    for real in (["seed=2"], ["optim.lr=1e-3"], ["trainer.max_steps=3"], ["router=dopd"]):
        assert job_key(compose_cfg([*FAST, "task=jsonl", *real], tmp_path)) != base, real


_DIRS = """
import sys, time
from hydra import compose, initialize_config_dir
import dopd
while time.time() < float(sys.argv[1]):
    time.sleep(0.005)
with initialize_config_dir(config_dir=str(dopd.PROJECT_ROOT / "conf"), version_base="1.3"):
    cfg = compose("train", return_hydra_config=True)
print(cfg.hydra.run.dir, cfg.hydra.sweep.dir)
"""


def test_two_launches_in_the_same_second_get_different_folders():
    """Folders named by the second alone were shared: one job overwrote the other's last.ckpt and job.json."""
    for _ in range(3):  # retry when the two processes did not land in the same second (a loaded machine)
        start = time.time() + 6  # both have imported dopd by then, and compose at the same instant
        procs = [subprocess.Popen([sys.executable, "-c", _DIRS, str(int(start) + 0.3)], cwd=Path(CONF).parent,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        lines = [p.communicate(timeout=120)[0].split() for p in procs]
        if Path(lines[0][0]).name[:19] == Path(lines[1][0]).name[:19]:  # the same second, to the folder name
            break
    else:
        pytest.skip("could not start two launches within one second")
    (run_a, sweep_a), (run_b, sweep_b) = lines
    assert run_a != run_b and sweep_a != sweep_b


def test_sweep_job_folders_are_safe_and_bounded():
    """Sweep subfolders name the job's overrides (`${dopd_job_dirname:}`): one folder level, bounded, unique."""
    assert dopd.safe_dirname("router=dopd,seed=2") == "router=dopd,seed=2"
    assert dopd.safe_dirname("task.files.train=/data/a b.jsonl") == "task.files.train=_data_a_b.jsonl"
    long_a, long_b = "x=" + "a" * 200, "x=" + "a" * 199 + "b"
    assert len(dopd.safe_dirname(long_a)) == 80 and dopd.safe_dirname(long_a) != dopd.safe_dirname(long_b)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk mid-write (ENOSPC after half the bytes) must leave the last whole checkpoint in place, and the
    run resumable. Both ways bytes reach the folder fail: torch.save into a file, and a move from the temp
    directory, which is a copy when outputs/ is on another filesystem (Lightning's default writer)."""
    real_save, real_move = torch.save, shutil.move

    def full_disk(data: bytes, f):
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO) or not (isinstance(obj, dict) and obj.get("global_step", 0) >= 2):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        if isinstance(f, (str, Path)):
            with open(f, "wb") as fh:
                full_disk(buf.getvalue(), fh)
        full_disk(buf.getvalue(), f)

    def move(src, dst, *args, **kwargs):  # a cross-device move is a copy into the destination
        if str(dst).endswith(".ckpt") and torch.load(src, weights_only=False)["global_step"] >= 2:
            with open(dst, "wb") as fh:
                full_disk(Path(src).read_bytes(), fh)
        return real_move(src, dst, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "move", move)
    with pytest.raises(OSError) as err:
        run(_job(tmp_path, "trainer.max_steps=3"))
    assert err.value.errno == errno.ENOSPC
    ckpts = tmp_path / "run" / "checkpoints"
    assert inspect_checkpoint(ckpts / "last.ckpt")["global_step"] == 1  # whole, the one before the failure
    assert not list(ckpts.glob(".*tmp")), "a partial temporary file was left behind"
    monkeypatch.undo()
    run(_job(tmp_path, "trainer.max_steps=3", f"resume={tmp_path / 'run'}"))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 3


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_last_ckpt_resumes_from_the_previous_one(finished, tmp_path, caplog):
    out = _copy(finished, tmp_path)
    ckpts = out / "run" / "checkpoints"
    assert inspect_checkpoint(previous_path(ckpts / "last.ckpt"))["global_step"] == 1
    _truncate(ckpts / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="dopd.checkpoints"):
        run(_job(out, f"resume={out / 'run'}"))
    assert "resuming from the previous checkpoint" in caplog.text and "last-prev.ckpt (step 1)" in caplog.text
    assert inspect_checkpoint(ckpts / "last.ckpt")["global_step"] == 2  # step 2 redone and written whole


def test_a_truncated_last_ckpt_without_a_previous_one_is_one_clear_line(finished, tmp_path):
    out = _copy(finished, tmp_path)
    ckpts = out / "run" / "checkpoints"
    previous_path(ckpts / "last.ckpt").unlink()
    _truncate(ckpts / "last.ckpt")
    with pytest.raises(CorruptCheckpointError) as err:
        find_resumable(_job(out, f"resume={out / 'run'}"))
    msg = str(err.value)
    assert "\n" not in msg and str(ckpts / "last.ckpt") in msg and "truncated" in msg and "resume=false" in msg


def test_resuming_another_jobs_folder_is_refused(finished, tmp_path):
    """resume=<folder> of a job with other settings would continue this job from that job's weights."""
    out = _copy(finished, tmp_path)
    cfg = _job(out, "seed=4", f"resume={out / 'run'}")
    with pytest.raises(JobMismatchError) as err:
        find_resumable(cfg)
    msg = str(err.value)
    assert "\n" not in msg and job_key(cfg) in msg and job_key(_job(out)) in msg
    assert "seed (1 there, 4 here)" in msg and "resume=false" in msg


def test_resume_true_refuses_a_checkpoint_that_another_job_wrote(finished, tmp_path):
    """Two jobs that shared a folder: job.json names this job, but last.ckpt was written by the other one."""
    out = _copy(finished, tmp_path)
    cfg = _job(out, "seed=4", "resume=true")
    (out / "runs").mkdir()
    shared = out / "runs" / "shared"
    shutil.copytree(out / "run", shared)
    (shared / "job.json").write_text(f'{{"key": "{job_key(cfg)}", "mlflow_run_id": "x", "tracking_uri": "y"}}')
    with pytest.raises(JobMismatchError, match="seed"):
        find_resumable(cfg)
