"""The SFT stage (`python train.py zoo=reason_m`, or `stage=sft sft.arch...`): build one model of the zoo.

A random-init Qwen3 model (Qwen3-VL with `sft.modality: vision`) of `sft.arch` learns the task from reference
solutions (dopd.sft), half of each batch with p, so it can read every hint form. The result is cached by config
hash under `outputs/zoo/<name>-<hash>/` (a rerun of the same config returns at once), logged to MLflow like any
run, and optionally copied to `sft.publish` (the shipped zoo under `zoo/`). Its `card.json` records the accuracy
without p and with p in each hint form: the testbed preconditions (i) and (iii) are read off these cards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dopd.build import build_task
from dopd.evaluation import accuracy_table
from dopd.models import tiny_qwen3
from dopd.sft import SFTConfig, sft
from dopd.tokenizer import char_tokenizer
from dopd.vision import ImageTextProcessor, tiny_qwen3_vl
from dopd.tracking import log_config, make_logger

log = logging.getLogger(__name__)
_SFT_KEYS = set(SFTConfig.__dataclass_fields__) - {"seed"}


def cache_key(cfg: DictConfig) -> str:
    """What determines the weights: the task, the SFT settings (not where they are published) and the seeds."""
    spec = {"task": OmegaConf.to_container(cfg.task, resolve=True), "seed": cfg.seed, "data_seed": cfg.data.seed,
            "sft": {k: v for k, v in OmegaConf.to_container(cfg.sft, resolve=True).items() if k != "publish"}}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def heldout(task, cfg: DictConfig) -> dict[str, list]:
    """The first `heldout_n` questions of every held-out split: never trained on (distillation evaluates there)."""
    return {split: task.examples(split, cfg.sft.heldout_n, cfg.data.seed) for split in task.splits[1:]}


def sft_data(task, cfg: DictConfig):
    """Training questions minus the held-out ones, and the first `eval_n` held-out questions per split."""
    held = heldout(task, cfg)
    banned = {ex.key for exs in held.values() for ex in exs}
    train = [ex for ex in task.examples(task.splits[0], cfg.sft.n_train, cfg.data.seed) if ex.key not in banned]
    return train, {split: exs[: cfg.sft.eval_n] for split, exs in held.items()}


def hint_form_accuracy(model, view, task, cfg: DictConfig, forms) -> dict[str, float]:
    """`acc_priv/<form>/<split>[/<domain>]`: the held-out questions with p in each form (precondition iii).

    A task's question stream does not depend on its hint form, so each variant asks the same questions.
    """
    out = {}
    for form in forms:
        variant = dataclasses.replace(task, hint_form=form)
        evals = {split: variant.examples(split, cfg.sft.eval_n, cfg.data.seed) for split in task.splits[1:]}
        out.update(accuracy_table(model, view, task, evals, prefix=f"acc_priv/{form}", privileged=True))
    return out


def build(cfg: DictConfig, root: Path) -> dict:
    """Train (or find in the cache) the model `cfg.sft` describes; returns its card."""
    s = cfg.sft
    out = Path(cfg.paths.output_dir) / "zoo" / f"{s.name}-{cache_key(cfg)}"
    if (out / "card.json").exists():
        log.info("zoo model %s is cached in %s (delete the folder to rebuild)", s.name, out)
        return _publish(out, s, root)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    task = build_task(cfg.task)
    from dopd.view import PrivilegedView

    vision = s.get("modality", "text") == "vision"
    processor = ImageTextProcessor() if vision else None
    tok, view_cfg = processor.tokenizer if vision else char_tokenizer(), cfg.task.view
    view = PrivilegedView(tok, **OmegaConf.to_container(view_cfg, resolve=True), processor=processor)
    train, evals = sft_data(task, cfg)
    arch = OmegaConf.to_container(s.arch, resolve=True)
    model = tiny_qwen3_vl(tok, **arch) if vision else tiny_qwen3(len(tok), **arch)
    n_params = sum(p.numel() for p in model.parameters())
    sft_cfg = SFTConfig(**{k: v for k, v in OmegaConf.to_container(s, resolve=True).items() if k in _SFT_KEYS},
                        seed=int(cfg.seed))
    logger = make_logger(cfg, root)
    try:
        log_config(logger, cfg, out)
        log.info("SFT %s: %s, %d parameters, %d training questions -> %s", s.name, arch, n_params, len(train), out)
        t0, c0 = time.time(), time.process_time()
        sft(model, view, train, sft_cfg, {k: v[: s.eval_n] for k, v in evals.items()}, task,
            on_eval=lambda step, m: logger.log_metrics({f"sft/{k}": v for k, v in m.items()}, step=step))
        train_s, train_cpu = time.time() - t0, time.process_time() - c0
        acc = accuracy_table(model, view, task, evals, prefix="acc")
        forms = getattr(task, "hint_forms", ())
        acc.update(hint_form_accuracy(model, view, task, cfg, forms) if forms else
                   accuracy_table(model, view, task, evals, prefix="acc_priv", privileged=True))
        logger.log_metrics(acc, step=sft_cfg.steps)
        for c in (model.config, model.generation_config):
            c.bos_token_id, c.eos_token_id, c.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        model.save_pretrained(out)
        (processor or tok).save_pretrained(out)
        card = {"name": s.name, "key": cache_key(cfg), "task": OmegaConf.to_container(cfg.task, resolve=True),
                "arch": {"family": type(model).__name__, **arch, "parameters": n_params},
                "sft": OmegaConf.to_container(s, resolve=True), "seed": cfg.seed, "train_questions": len(train),
                "eval_n": s.eval_n, "train_wall_s": round(train_s, 1), "train_cpu_s": round(train_cpu, 1),
                "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__},
                "accuracy": {k: round(v, 4) for k, v in sorted(acc.items())}}
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        logger.experiment.log_artifact(logger.run_id, str(out / "card.json"))
        logger.finalize("success")
    except BaseException as err:
        logger.experiment.set_tag(logger.run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        logger.finalize("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    log.info("SFT %s done in %.0fs: %s", s.name, train_s, {k: round(v, 3) for k, v in acc.items() if k.count("/") == 1})
    return _publish(out, s, root)


def _publish(out: Path, s: DictConfig, root: Path) -> dict:
    if s.get("publish"):
        dest = Path(s.publish) if Path(s.publish).is_absolute() else root / s.publish
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out, dest)
        log.info("published %s -> %s", out.name, dest)
    return json.loads((out / "card.json").read_text())
