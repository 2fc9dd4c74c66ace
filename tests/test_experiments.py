"""Every paper experiment in conf/experiment composes for every value its sweep takes (each row is a valid job)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import dopd
from dopd.pipeline import build_router, build_task
from tests.conftest import compose_cfg

EXPERIMENTS = sorted(p.stem for p in (dopd.PROJECT_ROOT / "conf" / "experiment").glob("[!_]*.yaml"))


def _sweep(name: str) -> dict[str, list[str]]:
    cfg = compose_cfg([f"experiment={name}"])
    return {k: str(v).split(",") if not str(v).startswith("[") else str(v).replace("],[", "]|[").split("|")
            for k, v in cfg.hydra.sweeper.params.items()}


def test_every_table_and_figure_has_an_experiment():
    for name in ("table1", "table2", "fig3", "fig4", "table3", "table4", "table5", "table6", "table7", "table8", "fig7b",
                 "fig10"):
        assert name in EXPERIMENTS
        assert "seed" in _sweep(name) and len(_sweep(name)["seed"]) >= 3, name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_swept_value_composes_with_one_budget(name, tmp_path):
    """Each row is a valid job, and the swept key is the only difference between jobs (same steps, batch, eval)."""
    sweep = _sweep(name)
    assert sweep, f"{name} sweeps nothing"
    budgets = set()
    for key, values in sweep.items():
        for value in values:
            cfg = compose_cfg([f"experiment={name}", f"{key}={value}"], tmp_path)
            assert cfg.logger.experiment == name
            build_router(cfg.router)
            if not name.endswith("_gpu"):  # the GPU task (CHAMP) needs the champ extra; the CPU one is built here
                build_task(cfg.task)
            budgets.add(OmegaConf.to_yaml({k: cfg[k] for k in ("trainer", "data", "optim", "rollout", "eval")}))
    assert len(budgets) == 1, name


def test_sweep_parent_records_what_the_experiment_sweeps():
    """The parent run's `overrides` tag (which the report groups by) has the config's sweep, the command line winning."""
    from dopd.tracking import sweep_overrides, swept_keys

    cfg = compose_cfg(["experiment=table4", "task.hint_form=none", "trainer.max_steps=5"])
    overrides = sweep_overrides(cfg)
    assert "task.hint_form=none" in overrides and "router=vanilla,dopd" in overrides
    assert "task.hint_form=answer,stepwise_exec,stepwise,summary,none" not in overrides
    assert sorted(swept_keys(overrides)) == ["router", "seed"]


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.endswith("_gpu")])
def test_gpu_variants_take_the_papers_step(name):
    """The paper's optimizer step (§5): 128 prompts (VLM: 64) x 4 rollouts in one batch, lr 5e-6, 200 steps (VLM:
    300), sampled in calls of rollout.batch_size rows and cut into loss micro-batches (optim.micro_batch_size) so
    one micro-batch's 150k-vocabulary logits fit on a GPU; the sizes pass the step checks."""
    from dopd.pipeline import check_step_sizes

    cfg = compose_cfg([f"experiment={name}"])
    vision = cfg.model.get("modality") == "vision"
    assert cfg.data.batch_size == (64 if vision else 128) and "accumulate_grad_batches" not in cfg.trainer
    assert cfg.optim.micro_batch_size < cfg.data.batch_size * cfg.rollout.n and not cfg.optim.keep_targets
    assert cfg.rollout.n == 4 and cfg.optim.lr == 5e-6 and cfg.router.gap.get("scope", "step") == "step"
    check_step_sizes(cfg)
    assert cfg.trainer.max_steps == (300 if vision else 200)
