"""From configs to objects: the composed config (`compose_config`) and the router, task and view it describes.

Both the distillation pipeline (`dopd.pipeline`, which re-exports these names) and the zoo's SFT stage (`dopd.zoo`)
build from here: the zoo does not import the pipeline (the pipeline imports the zoo for `stage=sft`), and
`dopd.settings` reads the YAML defaults through `compose_config` without loading Lightning.
"""

from __future__ import annotations

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from dopd.routing import GapSpec, PruneSpec, RouterSpec, Rule
from dopd.view import PrivilegedView

_RULE_KEYS = set(Rule.__dataclass_fields__)


def compose_config(overrides: list[str]) -> DictConfig:
    """train.py's config with these overrides, for scripts that run outside a Hydra app (the same conf/ tree)."""
    from hydra import compose, initialize_config_dir

    import dopd

    with initialize_config_dir(config_dir=str(dopd.PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def build_router(cfg: DictConfig) -> RouterSpec:
    """A router config -> RouterSpec. Each rule is a mapping, a list of mappings (losses add up) or null (dropped)."""
    rules = {}
    for name, rule in cfg.rules.items():
        rule = OmegaConf.to_container(rule, resolve=True) if rule is not None else None
        items = rule if isinstance(rule, list) else [] if rule is None else [rule]
        for item in items:
            unknown = set(item) - _RULE_KEYS
            if unknown:
                raise ValueError(f"router.rules.{name} has unknown keys {sorted(unknown)}; valid: {sorted(_RULE_KEYS)}")
        try:
            built = tuple(Rule(**item) for item in items)
        except ValueError as err:  # name the rule: its values often come from router.top_k / beta_* interpolations
            raise ValueError(f"router.rules.{name}: {err} (router.top_k, router.beta_light and router.beta_weak "
                             f"fill the DOPD rules)") from None
        rules[str(name)] = None if rule is None else built if isinstance(rule, list) else built[0]
    return RouterSpec(
        name=str(cfg.name), rules=rules, student_context=str(cfg.get("student_context", "plain")),
        gap=GapSpec(**OmegaConf.to_container(cfg.get("gap", {}), resolve=True)),
        prune=PruneSpec(**OmegaConf.to_container(cfg.get("prune", {}), resolve=True)),
        temperature=float(cfg.get("temperature", 1.0)), chunk_size=int(cfg.get("chunk_size", 1024)),
        trim_top=float(cfg.get("trim_top", 0.05)),
    )


def build_task(cfg: DictConfig):
    """The task config -> a task; its own errors (bad data, bad settings) reach the user unwrapped by Hydra."""
    spec = OmegaConf.to_container(cfg, resolve=True)
    spec.pop("view", None)
    try:
        return hydra.utils.instantiate(spec)
    except InstantiationException as err:  # Hydra prints these as one line: keep ours, without its wrapper
        if isinstance(err.__cause__, (ValueError, FileNotFoundError, ImportError)):
            raise InstantiationException(f"task: {err.__cause__}") from err.__cause__
        raise


def build_view(cfg: DictConfig, tokenizer, processor=None) -> PrivilegedView:
    v = cfg.task.view
    return PrivilegedView(tokenizer, plain=v.plain, privileged=v.privileged, empty_hint=v.empty_hint,
                          chat=bool(cfg.model.get("chat", False)), chat_kwargs=OmegaConf.to_container(cfg.model.chat_kwargs, resolve=True) if cfg.model.get("chat_kwargs") else {},
                          processor=processor)
