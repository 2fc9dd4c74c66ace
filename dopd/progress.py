"""The console while a job runs: a progress bar in optimizer steps with the last loss and evaluation accuracy, one
line per evaluation, and the libraries' routine output silenced unless `verbose=true`.

`console_callbacks(cfg)` builds the callbacks (dopd.pipeline._train); `quiet_libraries(verbose)` sets the logging
and warning filters (dopd.pipeline.run, before anything is loaded).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

from lightning.pytorch.callbacks import Callback, ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n, convert_inf

log = logging.getLogger(__name__)
ACC = "eval/acc/avg"

# Routine INFO lines: "GPU available: False", "TPU available", the litlogger tip, "Seed set to", "`Trainer.fit`
# stopped", LOCAL_RANK/CUDA_VISIBLE_DEVICES, MLflow's database creation. Their WARNINGs and errors still show.
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda",
                 "mlflow.store.db.utils", "alembic.runtime.migration")
# Known harmless warnings, by message (regexes matched from the start of the message).
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own pytree helper on torch >= 2.10
)
_quiet_filters: list[tuple] = []


class _DropWhenRootHandles(logging.Filter):
    """Lightning's own console handler on the `lightning` logger repeats every line that Hydra's root handler
    already prints (`INFO: ...` then `[time][name][INFO] - ...`): drop its copy while the root has handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


_DEDUP = _DropWhenRootHandles()


def quiet_libraries(verbose: bool = False) -> None:
    """verbose=False: silence the routine output listed above and transformers' weight-loading bars; real warnings
    (dopd's, the module's near-uniform-teacher one, any other library's) still show. verbose=True undoes it."""
    from transformers.utils import logging as hf_logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for handler in logging.getLogger("lightning").handlers:
        (handler.addFilter if not verbose else handler.removeFilter)(_DEDUP)
    for entry in _quiet_filters:  # remove ours, then add them again unless verbose
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)
    _quiet_filters.clear()
    if verbose:
        hf_logging.enable_progress_bar()
        return
    hf_logging.disable_progress_bar()
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
        _quiet_filters.append(warnings.filters[0])


def eval_line(results: dict[str, float], step: int, max_steps: int | None) -> str:
    """`step 50/200: eval/acc/avg 0.4521 (test 0.61, ood 0.29)`: the average over splits, then each split."""
    splits = [f"{k.split('/')[2]} {v:.2f}" for k, v in results.items()
              if k.startswith("eval/acc/") and k.count("/") == 2 and k != ACC]
    total = f"/{max_steps}" if max_steps and max_steps > 0 else ""
    line = f"step {step}{total}: {ACC} {results.get(ACC, float('nan')):.4f}"
    return f"{line} ({', '.join(splits)})" if splits else line


class EvalLines(Callback):
    """Logs one line per evaluation of the student (DistillModule.last_eval), as soon as it is done: the one at
    the start (before the first step), those inside training steps, and one at the end of training."""

    def __init__(self) -> None:
        self.printed_at: int | None = None

    def _maybe_print(self, trainer, pl_module) -> None:
        step, results = getattr(pl_module, "_evaluated_at", -1), getattr(pl_module, "last_eval", None)
        if not results or step < 0 or step == self.printed_at or not trainer.is_global_zero:
            return
        self.printed_at = step
        bar = trainer.progress_bar_callback
        with bar.external_write() if isinstance(bar, _StepBar) else contextlib.nullcontext():
            log.info(eval_line(results, step, trainer.max_steps))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_print(trainer, pl_module)  # the evaluation at the start (module.on_train_start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_print(trainer, pl_module)  # the step's own (the module evaluates inside training_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._maybe_print(trainer, pl_module)  # training ended other than at max_steps (module.on_train_end)


class _StepBar:
    """Shared by both bars: counts optimizer steps (trainer.global_step) of trainer.max_steps over all epochs, and
    shows the last loss and the last evaluation accuracy, without Lightning's `v_num`."""

    description = "Step"

    @property
    def total_train_batches(self):
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def get_metrics(self, trainer, pl_module):
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        last = getattr(pl_module, "last_eval", None) or {}
        if ACC in last:
            items[ACC] = float(last[ACC])
        return items

    def external_write(self):
        """A context in which log lines to the console do not break the bar."""
        return contextlib.nullcontext()


class StepRichProgressBar(_StepBar, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return self.description

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_disabled or (self.train_progress_bar_id is not None and not self._leave):
            return  # one bar for the whole run: a new epoch does not reset it
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    @contextlib.contextmanager
    def external_write(self):
        # While the bar is live, sys.stdout/sys.stderr are rich's proxies that print above it; console log handlers
        # hold the real streams: point them at the proxies for the line.
        swapped = []
        if self.progress is not None and not self._progress_stopped:
            proxies = {sys.__stdout__: sys.stdout, sys.__stderr__: sys.stderr}
            for handler in logging.getLogger().handlers:
                stream = getattr(handler, "stream", None)
                if isinstance(handler, logging.StreamHandler) and proxies.get(stream, stream) is not stream:
                    swapped.append((handler, handler.setStream(proxies[stream])))
        try:
            yield
        finally:
            for handler, stream in swapped:
                handler.flush()
                handler.setStream(stream)


class StepTQDMProgressBar(_StepBar, TQDMProgressBar):
    @property
    def train_description(self) -> str:
        return self.description

    def on_train_epoch_start(self, trainer, *_) -> None:
        bar = self.train_progress_bar
        if getattr(bar, "_dopd_started", False) and not self._leave:
            return  # one bar for the whole run: a new epoch does not reset it
        if self._leave:
            self.train_progress_bar = bar = self.init_train_tqdm()
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0
        bar.set_description(self.description)
        _update_n(bar, trainer.global_step)
        bar._dopd_started = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def external_write(self):
        from tqdm import tqdm

        return tqdm.external_write_mode(file=sys.stdout)


def console_callbacks(cfg, progress_bar: bool = True) -> list[Callback]:
    """The per-evaluation lines, the step bar (rich or tqdm, `rich_progress`) and, unless `verbose`, no model
    summary table (a ModelSummary of depth 0 stands in for Lightning's default one)."""
    callbacks: list[Callback] = [EvalLines()]
    if not cfg.get("verbose", False):
        callbacks.append(ModelSummary(max_depth=0))
    if progress_bar:
        callbacks.append(StepRichProgressBar() if cfg.get("rich_progress", True) else StepTQDMProgressBar())
    return callbacks
