"""Entry point: `python train.py router=dopd seed=1`, or a sweep: `python train.py -m router=vanilla,dopd seed=1,2,3`.

Config groups live in conf/ (`python train.py --help` lists them). One job = one MLflow run; a multirun adds a
parent run. The work happens in dopd.pipeline.run.
"""

import hydra
from omegaconf import DictConfig

import dopd  # noqa: F401  (registers the ${dopd_root:} resolver; light)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Imported here, not above, so that `--help`, `--cfg`, shell completion and config errors answer in about a
    # second: dopd.pipeline loads torch, Lightning and MLflow (tests/test_cli_speed.py).
    import logging

    from dopd import tracking
    from dopd.pipeline import run

    # SIGTERM (pre-emption) and Ctrl-C end the MLflow run KILLED and the process with status 128 + the signal.
    tracking.catch_signals()
    try:
        result = run(cfg)
    except Exception as err:
        # In a sweep, one failing job must not cost the others: record it (its MLflow run is already FAILED) and go
        # on; the sweep exits non-zero at the end. A single run fails at once.
        if not tracking.record_failure(cfg, err):
            raise
        return float("nan")
    except BaseException as err:
        # Lightning turns SIGTERM into SystemExit() (status 0) and Ctrl-C into sys.exit(1): name the signal again.
        sig = tracking.interrupt_signal(err)
        if sig is None:
            raise
        if not tracking.record_failure(cfg, err):  # a sweep stops here, with the job in failed_jobs.txt
            logging.getLogger(__name__).error("stopped by a signal; the MLflow run is marked KILLED")
        raise tracking.Interrupted(sig) from err
    if tracking.in_multirun() and tracking.received_signal() is not None:  # it came as the job ended: stop the sweep
        raise tracking.Interrupted(tracking.received_signal())
    return result


if __name__ == "__main__":
    main()
