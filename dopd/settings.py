"""Typed views of the `data`, `rollout`, `optim` and `eval` blocks: every value checked, in one line, before any model.

The defaults live in one place, the YAML (conf/train.yaml, conf/rollout/default.yaml): these classes have none.
`complete(section, values)` fills what a caller left out (tests and scripts build a DistillModule with a few keys)
from that YAML, so code never restates a default; `check(section, values)` rejects an unknown key by name (with the
nearest valid one) and a value of the wrong type or range, naming the key and what it may be.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass


# Top-level keys that change no trained weight or metric: where things go and how the console looks. One list, read
# by the job key (a resume finds the same job), run names and sweep folder names.
NOT_A_RESULT = ("hydra", "resume", "logger", "paths", "rich_progress", "verbose", "num_threads", "checkpoint_every",
                "continue_on_error", "export_student", "trainer.enable_progress_bar", "trainer.enable_model_summary")


class ConfigError(ValueError):
    """A config value that cannot run; its message is one line naming the key."""


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


@dataclass(frozen=True)
class DataSettings:
    batch_size: int
    n_train: int
    n_eval: int
    seed: int

    RULES = {"batch_size": (_positive, "> 0"), "n_train": (_positive, "> 0"), "n_eval": (_positive, "> 0")}


@dataclass(frozen=True)
class RolloutSettings:
    n: int
    batch_size: typing.Optional[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    engine: str

    RULES = {"n": (_positive, "> 0"), "batch_size": (_positive, "> 0 or null"),
             "max_new_tokens": (_positive, "> 0"), "temperature": (_positive, "> 0 (sampling; evaluation is greedy)"),
             "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "top_k": (_non_negative, ">= 0 (0: off)"),
             "engine": (lambda v: v in ("auto", "lean", "hf"), "one of auto, lean, hf")}


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    weight_decay: float
    betas: typing.Tuple[float, float]
    warmup_steps: int
    scheduler: str
    min_lr_ratio: float
    max_nonfinite_steps: int
    micro_batch_size: typing.Optional[int]
    keep_targets: bool

    RULES = {"lr": (_positive, "> 0"), "weight_decay": (_non_negative, ">= 0"),
             "betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
             "warmup_steps": (_non_negative, ">= 0"), "scheduler": (lambda v: v in ("cosine", "constant"),
                                                                    "one of cosine, constant"),
             "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "max_nonfinite_steps": (_non_negative, ">= 0"),
             "micro_batch_size": (_positive, "> 0 or null")}


@dataclass(frozen=True)
class EvalSettings:
    every: int
    batch_size: int
    at_start: bool
    teacher_reference: bool
    pass_k: int
    routing_samples: int

    RULES = {"every": (_non_negative, ">= 0 (0: only at the start and the end)"), "batch_size": (_positive, "> 0"),
             "pass_k": (_non_negative, ">= 0 (> 1: pass@k)"), "routing_samples": (_non_negative, ">= 0 (0: off)")}


SECTIONS = {"data": DataSettings, "rollout": RolloutSettings, "optim": OptimSettings, "eval": EvalSettings}


def _accepts(kind, value) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return any(_accepts(a, value) for a in args)
    if kind is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(_accepts(a, v) for a, v in zip(args, value))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(section: str, values: dict):
    """The section's typed settings from a complete mapping, or a ConfigError naming the first bad key."""
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {section}.{near[0]}?" if near else f"; valid: {', '.join(fields)}"
            raise ConfigError(f"{section}.{key} is not a setting{hint}")
    missing = [k for k in fields if k not in values]
    if missing:
        raise ConfigError(f"{section} lacks {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        kind = hints[key]
        if not _accepts(kind, value):
            name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
            raise ConfigError(f"{section}.{key}={value!r} must be of type {name}")
        rule = cls.RULES.get(key)
        if rule is not None and value is not None and not rule[0](value):
            raise ConfigError(f"{section}.{key}={value!r} must be {rule[1]}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@functools.lru_cache(maxsize=None)
def _defaults() -> dict:
    from omegaconf import OmegaConf

    from dopd.build import compose_config

    cfg = compose_config([])
    return {name: OmegaConf.to_container(cfg[name], resolve=True) for name in SECTIONS}


def complete(section: str, values: dict | None) -> dict:
    """`values` over the YAML defaults of the section, checked (for code that passes only a few keys)."""
    from omegaconf import OmegaConf

    values = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
              for k, v in (values or {}).items()}
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    merged = values if fields <= set(values) else {**_defaults()[section], **values}  # complete ones compose nothing
    check(section, merged)
    return merged


def check_all(cfg) -> None:
    """Every section of a composed config (pipeline.run, before MLflow or any model), plus the cross-checks."""
    from omegaconf import OmegaConf

    out = {name: check(name, OmegaConf.to_container(cfg[name], resolve=True)) for name in SECTIONS}
    data = out["data"]
    if data.batch_size > data.n_train:
        raise ConfigError(f"data.batch_size={data.batch_size} exceeds data.n_train={data.n_train}: a step needs "
                          f"at least that many training prompts (e.g. data.n_train={data.batch_size})")
