"""Config values are checked before MLflow or any model is touched, each error one line naming the key."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dopd.pipeline import build_router, run
from dopd.settings import ConfigError, check, check_all, complete
from tests.conftest import CONF, FAST, compose_cfg


@pytest.mark.parametrize("override, message", [
    ("rollout.temperature=-1", r"rollout.temperature=-1 must be > 0"),
    ("data.batch_size=0", r"data.batch_size=0 must be > 0"),
    ("data.n_eval=0", r"data.n_eval=0 must be > 0"),
    ("eval.every=-5", r"eval.every=-5 must be >= 0"),
    ("rollout.max_new_tokens=abc", r"rollout.max_new_tokens='abc' must be of type int"),
    ("optim.scheduler=linear", r"optim.scheduler='linear' must be one of cosine, constant"),
    ("data.n_train=8", r"data.batch_size=16 exceeds data.n_train=8"),
    ("+optim.warmup_step=5", r"optim.warmup_step is not a setting; did you mean optim.warmup_steps\?"),
])
def test_a_bad_value_is_one_line_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_all(compose_cfg([override]))
    assert "\n" not in str(err.value)


def test_router_rule_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"router.rules.LH: router rule top_k must be positive, got 0"):
        build_router(compose_cfg(["router=dopd", "router.top_k=0"]).router)


def test_partial_sections_take_the_yaml_defaults():
    assert complete("eval", {"every": 0})["batch_size"] == compose_cfg([]).eval.batch_size
    with pytest.raises(ConfigError, match="eval.evry is not a setting; did you mean eval.every"):
        complete("eval", {"evry": 3})
    assert check("optim", complete("optim", {"lr": 1.0})).betas == (0.9, 0.999)


def test_a_config_error_leaves_no_mlflow_run(tmp_path, tracking_uri):
    with pytest.raises(ConfigError):
        run(compose_cfg([*FAST, "rollout.temperature=-1", f"logger.tracking_uri={tracking_uri}"], tmp_path))
    assert not (tmp_path / "mlflow.db").exists()  # failed before MLflow was touched


def test_train_py_answers_a_bad_value_quickly():
    t0 = time.time()
    res = subprocess.run([sys.executable, "train.py", "rollout.temperature=-1"], cwd=CONF.rsplit("/", 1)[0],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "rollout.temperature=-1 must be > 0" in res.stderr
    assert time.time() - t0 < 60  # no model loaded (it used to take ~40 s and leave a FAILED run)
