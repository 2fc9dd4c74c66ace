"""The console while a job runs (dopd.progress): a bar in optimizer steps with the last loss and eval accuracy, one
line per evaluation, and the libraries' routine output silenced unless verbose=true."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

import dopd
from dopd.progress import (
    ACC,
    EvalLines,
    StepRichProgressBar,
    StepTQDMProgressBar,
    eval_line,
    quiet_libraries,
)

RESULTS = {"eval/acc/test": 0.61, "eval/response_len/test": 19.5, "eval/acc/ood": 0.29, "eval/acc/test/add": 0.7,
           "eval/acc/avg": 0.45213}


def fake_run(max_steps=200, global_step=50, num_training_batches=4):
    logger = SimpleNamespace(version="4a38")
    trainer = SimpleNamespace(max_steps=max_steps, max_epochs=-1, global_step=global_step, current_epoch=3,
                              num_training_batches=num_training_batches, loggers=[logger],
                              progress_bar_metrics={"loss": 0.411}, is_global_zero=True, progress_bar_callback=None)
    module = SimpleNamespace(last_eval=dict(RESULTS), _evaluated_at=global_step)
    return trainer, module


@pytest.mark.parametrize("bar_class", [StepRichProgressBar, StepTQDMProgressBar])
def test_bar_counts_steps_and_shows_loss_and_last_eval_accuracy(bar_class):
    trainer, module = fake_run()
    bar = bar_class()
    bar._trainer = trainer
    metrics = bar.get_metrics(trainer, module)
    assert "v_num" not in metrics
    assert metrics["loss"] == pytest.approx(0.411)
    assert metrics[ACC] == pytest.approx(0.45213)
    # the total is trainer.max_steps, not the epoch's batches (4 here), and the description names steps
    assert bar.total_train_batches == 200
    description = (bar._get_train_description(trainer.current_epoch) if bar_class is StepRichProgressBar
                   else bar.train_description)
    assert "Epoch" not in description and "Step" in description


def test_tqdm_bar_position_is_the_global_step_across_epochs():
    trainer, module = fake_run(max_steps=10, global_step=0, num_training_batches=3)
    bar = StepTQDMProgressBar()
    bar._trainer = trainer
    bar.train_progress_bar = bar.init_train_tqdm()
    bar.train_progress_bar.disable = False
    for epoch in range(3):  # 3 batches an epoch: the bar keeps counting where the last epoch stopped
        trainer.current_epoch = epoch
        bar.on_train_epoch_start(trainer, module)
        for batch_idx in range(3):
            trainer.global_step += 1
            bar.on_train_batch_end(trainer, module, None, None, batch_idx)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (9, 10)
    assert "Step" in bar.train_progress_bar.desc
    bar.train_progress_bar.close()


def test_eval_line_names_the_average_and_each_split():
    assert eval_line(RESULTS, 50, 200) == "step 50/200: eval/acc/avg 0.4521 (test 0.61, ood 0.29)"


def test_eval_lines_logs_each_evaluation_once(caplog):
    trainer, module = fake_run(global_step=0)
    callback = EvalLines()
    with caplog.at_level(logging.INFO, logger="dopd.progress"):
        callback.on_train_batch_start(trainer, module, None, 0)  # the evaluation at the start
        trainer.global_step = 1
        callback.on_train_batch_end(trainer, module, None, None, 0)  # no new evaluation in step 1
        trainer.global_step, module._evaluated_at = 2, 2
        callback.on_train_batch_end(trainer, module, None, None, 1)
        callback.on_fit_end(trainer, module)  # nothing new at the end
    lines = [r.getMessage() for r in caplog.records if r.name == "dopd.progress"]
    assert lines == ["step 0/200: eval/acc/avg 0.4521 (test 0.61, ood 0.29)",
                     "step 2/200: eval/acc/avg 0.4521 (test 0.61, ood 0.29)"]


def test_quiet_keeps_real_warnings_and_verbose_restores():
    info_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_libraries(verbose=False)
            assert not info_logger.isEnabledFor(logging.INFO) and info_logger.isEnabledFor(logging.WARNING)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("the teacher distribution is near-uniform (entropy > 95% of log V)", UserWarning)
            quiet_libraries(verbose=True)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ... (again)", FutureWarning)
        messages = [str(w.message) for w in caught]
        assert any("near-uniform" in m for m in messages)
        assert [m for m in messages if "LeafSpec" in m] == ["`isinstance(treespec, LeafSpec)` is deprecated, use ... "
                                                            "(again)"]
        assert info_logger.isEnabledFor(logging.INFO)
    finally:
        quiet_libraries(verbose=True)


# Lines of Lightning's and transformers' routine output, as they read today.
NOISE = ("GPU available", "TPU available", "litlogger", "Trainable params", "Seed set to", "LeafSpec",
         "Loading weights")
ALWAYS_IN_VERBOSE = ("GPU available", "litlogger", "Trainable params")


def train_output(tmp_path, *extra: str) -> str:
    overrides = ["model=tiny_random", "trainer.max_steps=2", "eval.every=1", "data.n_eval=8", "data.n_train=64",
                 "data.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=8", "rich_progress=false",
                 "eval.routing_samples=0", "eval.teacher_reference=false",
                 f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", *extra]
    proc = subprocess.run([sys.executable, str(dopd.PROJECT_ROOT / "train.py"), *overrides], capture_output=True,
                          text=True, timeout=300, cwd=dopd.PROJECT_ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def test_train_prints_each_evaluation_and_no_library_noise_unless_verbose(tmp_path):
    quiet = train_output(tmp_path / "quiet")
    for step in (0, 1, 2):
        assert f"step {step}/2: eval/acc/avg " in quiet
    assert "(test " in quiet and "Step:" in quiet and "eval/acc/avg=" in quiet  # the tqdm bar's postfix
    assert "v_num" not in quiet and "Epoch 0" not in quiet
    verbose = train_output(tmp_path / "verbose", "verbose=true")
    for marker in ALWAYS_IN_VERBOSE:
        assert marker in verbose
    for marker in NOISE:
        assert marker not in quiet, marker
