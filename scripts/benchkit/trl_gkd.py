"""TRL's `GKDTrainer` side by side with our vanilla OPD: lmbda=1, beta=1 (reverse KL), the same models, batch rows,
generation length and sampling, fp32, no gradient checkpointing, the same AdamW and clipping."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import tempfile
import time
import warnings

import torch

from .clocks import PeakMemory, median, sync
from .workloads import Workload


def bench_trl_gkd(w: Workload, steps: int, warmup: int, device, dtype) -> dict:
    """TRL's GKDTrainer on the same models, rows, generation length and sampling; lmbda=1 (always on-policy),
    beta=1 (TRL's reverse KL, our vanilla's divergence); fp32 and no gradient checkpointing as ours (TRL's SFT
    defaults turn both bf16 and gradient checkpointing on); torch AdamW, lr 3e-4 constant, clip 1.0."""
    import logging

    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    s = w.spec
    rows = s.prompts * s.n
    if s.vocab is None:  # text prompts through TRL's ChatML collator; the template writes the bare text, as our view
        tok = copy.deepcopy(w.tokenizer)
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        data = [{"messages": [{"role": "user", "content": w.view.text(ex, False)},
                              {"role": "assistant", "content": ex.solution}]} for ex in w.examples]
    else:  # id prompts: pre-tokenised rows with a completion mask (the collator's tokenizer-free path)
        from dopd.tokenizer import char_tokenizer

        tok = char_tokenizer()  # only its pad/eos ids (0/2, as IdTokenizer) are read
        data = []
        for ex in w.examples:
            ids = [int(i) for i in ex.question.split()]
            data.append({"prompt": "-", "input_ids": ids + [5] * 4, "completion_mask": [0] * len(ids) + [1] * 4})
    # exactly `rows` per batch for every step (a partial last batch would be a cheaper step)
    n_rows = rows * (warmup + steps + 1)
    data = (data * math.ceil(n_rows / max(1, len(data))))[:n_rows]
    student = copy.deepcopy(w.student).train()
    student.generation_config.eos_token_id = w.tokenizer.eos_token_id  # stop at EOS, as our rollout does
    cuda = torch.device(device).type == "cuda"

    class Timer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.wall.append(time.perf_counter() - self.t[0])
            self.cpu.append(time.process_time() - self.t[1])

    class Counting(GKDTrainer):
        trained: list[int]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.trained.append(int((inputs["labels"][:, 1:] != -100).sum()))
            self.rows_seen.add(int(inputs["input_ids"].shape[0]))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    timer, mem = Timer(), PeakMemory(device)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GKDConfig(output_dir=out, per_device_train_batch_size=rows, max_steps=warmup + steps, lmbda=1.0,
                         beta=1.0, temperature=s.temperature, max_new_tokens=s.max_new_tokens, max_length=1024,
                         learning_rate=3e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                         weight_decay=0.0, optim="adamw_torch", gradient_checkpointing=False,
                         bf16=bool(cuda and dtype == torch.bfloat16), fp16=False, use_cpu=not cuda,
                         report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                         dataloader_num_workers=0, dataloader_drop_last=True, seed=0)
        trainer = Counting(model=student, teacher_model=w.teacher, args=args, train_dataset=Dataset.from_list(data),
                           processing_class=tok, callbacks=[timer])
        trainer.trained, trainer.rows_seen = [], set()
        mem.reset()
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its final log line
            trainer.train()
        peak, delta = mem.read()
    wall, cpu = timer.wall[warmup:], timer.cpu[warmup:]
    trained = trainer.trained[warmup:]
    return {"step_ms_wall": min(wall) * 1e3, "step_ms_cpu": min(cpu) * 1e3, "step_ms_wall_median": median(wall) * 1e3,
            "step_ms_cpu_median": median(cpu) * 1e3, "steps": len(wall), "trained_tokens": median(trained),
            "rows_per_step": sorted(trainer.rows_seen), "peak_mib": peak, "fit_peak_delta_mib": delta,
            "settings": {"lmbda": 1.0, "beta": 1.0, "rows": rows, "max_new_tokens": s.max_new_tokens,
                         "temperature": s.temperature, "gradient_checkpointing": False, "optim": "adamw_torch"}}
