"""Entry point: `python train.py router=dopd seed=1`, or a sweep: `python train.py -m router=vanilla,dopd seed=1,2,3`.

Config groups live in conf/ (`python train.py --help` lists them). One job = one MLflow run; a multirun adds a
parent run. The work happens in dopd.pipeline.run.
"""

import hydra
from omegaconf import DictConfig

import dopd  # noqa: F401  (registers the ${dopd_root:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from dopd.pipeline import run  # imported here so `--help` and config errors answer at once

    return run(cfg)


if __name__ == "__main__":
    main()
