"""The full Lightning step: `DistillModule` under `lightning.Trainer`, timed per batch by a callback."""

from __future__ import annotations

import copy
import time
import warnings

import torch

from .clocks import PeakMemory, median, sync
from .workloads import Workload


def bench_lightning(w: Workload, spec, steps: int, warmup: int, device, dtype) -> dict:
    import logging

    import lightning as L
    from torch.utils.data import DataLoader

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from dopd.module import DistillModule

    class Data(L.LightningDataModule):
        eval_examples: dict = {}  # no evaluation: DistillModule.on_train_end then evaluates nothing

        def train_dataloader(self):
            return DataLoader(w.examples, batch_size=w.spec.prompts, shuffle=False, collate_fn=list, drop_last=True)

    class Timer(L.Callback):
        def __init__(self):
            self.wall, self.cpu, self.tokens = [], [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            sync(device)
            self.t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            sync(device)
            self.wall.append(time.perf_counter() - self.t[0])
            self.cpu.append(time.process_time() - self.t[1])
            length = module.step_metrics.get("train/response_len")  # mean response length of the step
            self.tokens.append(float(length) * len(batch) * s.n if length is not None else float("nan"))

    s = w.spec
    module = DistillModule(copy.deepcopy(w.student), w.teacher, w.view, spec, w.task,
                           rollout={"n": s.n, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                                    "top_p": 1.0, "top_k": 0},
                           optim={"lr": 3e-4, "warmup_steps": 0, "scheduler": "constant"},
                           eval={"every": 0, "at_start": False, "routing_samples": 0}, gradient_clip_val=1.0)
    timer, mem = Timer(), PeakMemory(device)
    accel = "gpu" if torch.device(device).type == "cuda" else "cpu"
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"
    trainer = L.Trainer(accelerator=accel, devices=1, max_steps=warmup + steps, logger=False, precision=precision,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    torch.manual_seed(1000)
    mem.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=Data())
    peak, delta = mem.read()
    wall, cpu = timer.wall[warmup:], timer.cpu[warmup:]
    return {"step_ms_wall": min(wall) * 1e3, "step_ms_cpu": min(cpu) * 1e3, "step_ms_wall_median": median(wall) * 1e3,
            "step_ms_cpu_median": median(cpu) * 1e3, "steps": len(wall), "peak_mib": peak, "fit_peak_delta_mib": delta,
            "trained_tokens": median(timer.tokens[warmup:])}
