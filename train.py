"""Entry point: `python train.py router=dopd seed=1`, or a sweep: `python train.py -m router=vanilla,dopd seed=1,2,3`.

Config groups live in conf/ (`python train.py --help` lists them). One job = one MLflow run; a multirun adds a
parent run. The work happens in dopd.pipeline.run.
"""

import hydra
from omegaconf import DictConfig

import dopd  # noqa: F401  (registers the ${dopd_root:} resolver)
from dopd.tracking import record_failure


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from dopd.pipeline import run  # imported here so `--help` and config errors answer at once

    try:
        return run(cfg)
    except Exception as err:
        # In a sweep, one failing job must not cost the others: record it (its MLflow run is already FAILED) and go
        # on; the sweep exits non-zero at the end. A single run fails at once.
        if not record_failure(cfg, err):
            raise
        return float("nan")


if __name__ == "__main__":
    main()
