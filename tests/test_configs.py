"""Every option of every config group composes, builds, and bad names fail with Hydra's list of options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dopd.pipeline import build_router, build_task
from tests.conftest import CONF, compose_cfg

GROUPS = ["router", "task", "model", "rollout", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    assert cfg[group] is not None
    build_router(cfg.router)
    build_task(cfg.task)


@pytest.mark.parametrize("router", options("router"))
def test_router_names_match_files(router, tmp_path):
    cfg = compose_cfg([f"router={router}"], tmp_path)
    assert build_router(cfg.router).name == router


def test_router_passes_are_minimal(tmp_path):
    passes = {r: build_router(compose_cfg([f"router={r}"], tmp_path).router).passes for r in options("router")}
    assert passes["vanilla"] == {"teacher"}
    assert passes["teacher_priv"] == {"teacher_priv"}
    assert passes["student_priv"] == {"student_priv"}
    assert passes["both_priv"] == {"teacher_priv"}
    assert passes["dopd"] == {"teacher_priv", "student_priv"}


def test_trainer_and_logger_overrides(tmp_path):
    cfg = compose_cfg(["trainer.max_steps=2", "logger.tracking_uri=sqlite:///x.db", "seed=7"], tmp_path)
    assert cfg.trainer.max_steps == 2 and cfg.logger.tracking_uri == "sqlite:///x.db" and cfg.seed == 7


def test_dopd_router_resolves_betas(tmp_path):
    spec = build_router(compose_cfg(["router=dopd", "router.beta_light=0.5", "router.beta_weak=0.2"], tmp_path).router)
    assert spec.rules["LH"].weight == 0.5 and spec.rules["HS"].weight == 0.5 and spec.rules["LL"].weight == 0.2
    assert spec.rules["HT"].scope == "full" and spec.rules["HT"].divergence == "js"


def test_bad_rule_key_is_named(tmp_path):
    cfg = compose_cfg(["router=vanilla", "+router.rules.all.wieght=2"], tmp_path)
    with pytest.raises(ValueError, match="wieght"):
        build_router(cfg.router)


def _train_py(*args, timeout=120):
    root = Path(CONF).parent
    return subprocess.run([sys.executable, str(root / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=root)


def test_help_lists_groups():
    out = _train_py("--help").stdout
    for g in GROUPS:
        assert f"{g}:" in out
    assert "dopd" in out and "vanilla" in out


def test_unknown_option_lists_valid_ones():
    res = _train_py("router=dopdd")
    assert res.returncode != 0
    assert "Could not find 'router/dopdd'" in res.stderr and "teacher_priv" in res.stderr


@pytest.mark.parametrize("launcher", ["slurm", "local_parallel"])
def test_launcher_configs_compose(launcher, tmp_path):
    cfg = compose_cfg([f"hydra/launcher={launcher}", "trainer=ddp_gpu"], tmp_path)
    launcher_cfg = cfg.hydra.launcher
    if launcher == "slurm":
        assert launcher_cfg.tasks_per_node == cfg.trainer.devices == launcher_cfg.gpus_per_node
        assert "submitit" in launcher_cfg._target_
    else:
        assert launcher_cfg.n_jobs == 2


def test_fsdp_strategy_builds_with_its_wrap_policy(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    from dopd.pipeline import build_strategy

    cfg = compose_cfg(["trainer=fsdp"], tmp_path)
    from omegaconf import OmegaConf

    strategy = build_strategy(OmegaConf.to_container(cfg.trainer.strategy, resolve=True))
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    assert Qwen3DecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert Qwen3DecoderLayer in strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes


# -- one statement of DOPD: the YAML and `dopd_spec()` must not drift apart -------------------------------------
def test_dopd_yaml_equals_dopd_spec(tmp_path):
    """`router=dopd` (what train.py runs) and `dopd_spec()` (what `dopd_loss` and the docs use) are one rule."""
    from dopd.routing import dopd_spec

    assert build_router(compose_cfg(["router=dopd"], tmp_path).router) == dopd_spec()


def _dopd_variant(name, drop=(), uniform=False, gap=None, **ht):
    """dopd_spec() with only the named changes: regimes dropped, one uniform rule, a GapSpec field, HT fields."""
    from dataclasses import replace

    from dopd.routing import Rule, dopd_spec

    spec = dopd_spec()
    rules = dict(spec.rules)
    if uniform:
        rules = {r: Rule("teacher_priv", "js", "topk", 1.0, beta=0.5) for r in rules}
    if ht:
        rules["HT"] = replace(rules["HT"], **ht)
    rules.update({r: None for r in drop})
    return replace(spec, name=name, rules=rules, gap=replace(spec.gap, **(gap or {})))


# Each DOPD variant's router, as its file's comment describes it: DOPD plus exactly these changes.
DOPD_VARIANTS = {
    "router=dopd_one_objective": _dopd_variant("dopd_one_objective", divergence="rkl"),
    "router=dopd_one_scope": _dopd_variant("dopd_one_scope", scope="topk"),
    "router=dopd_random_routing": _dopd_variant("dopd_random_routing", gap={"assign": "random"}),
    "router=dopd_uniform": _dopd_variant("dopd_uniform", uniform=True),
    "ablation=dopd": _dopd_variant("dopd"),
    "ablation=t6_all_uniform": _dopd_variant("dopd_uniform", uniform=True),
    "ablation=t6_ht_hs": _dopd_variant("dopd", drop=("LH", "LL")),
    "ablation=t6_ht_hs_uniform": _dopd_variant("dopd_uniform", drop=("LH", "LL"), uniform=True),
    "ablation=t6_ht_lh": _dopd_variant("dopd", drop=("LL", "HS")),
    "ablation=t6_ht_lh_uniform": _dopd_variant("dopd_uniform", drop=("LL", "HS"), uniform=True),
    "ablation=t6_ht_ll": _dopd_variant("dopd", drop=("LH", "HS")),
    "ablation=t6_ht_ll_uniform": _dopd_variant("dopd_uniform", drop=("LH", "HS"), uniform=True),
    "ablation=t6_ht_uniform": _dopd_variant("dopd_uniform", drop=("LH", "LL", "HS"), uniform=True),
    "ablation=t8_no_privileged": _dopd_variant("dopd"),
    "ablation=t8_no_student": _dopd_variant("dopd", drop=("LL", "HS")),
    "ablation=t8_no_teacher": _dopd_variant("dopd", drop=("LH", "HT")),
    "ablation=t8_one_objective": _dopd_variant("dopd_one_objective", divergence="rkl"),
    "ablation=t8_one_scope": _dopd_variant("dopd_one_scope", scope="topk"),
    "ablation=t8_random_routing": _dopd_variant("dopd_random_routing", gap={"assign": "random"}),
}


def test_every_dopd_variant_is_listed():
    """A new conf/router/dopd_*.yaml or a DOPD-based ablation must get its expected spec above."""
    dopd_based = {f"router={o}" for o in options("router") if o.startswith("dopd_")}
    dopd_based |= {f"ablation={o}" for o in options("ablation")
                   if "/router: dopd" in (Path(CONF) / "ablation" / f"{o}.yaml").read_text()}
    assert dopd_based == set(DOPD_VARIANTS)


@pytest.mark.parametrize("override", sorted(DOPD_VARIANTS))
def test_dopd_variants_differ_only_where_they_say(override, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    assert build_router(cfg.router) == DOPD_VARIANTS[override]
    if override == "ablation=t8_no_privileged":  # its one change is outside the router: p is empty
        assert cfg.task.hint_form == "none" and compose_cfg([], tmp_path).task.hint_form != "none"
