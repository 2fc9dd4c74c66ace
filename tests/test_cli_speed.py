"""`python train.py --help`, `--cfg job`, `--info` and shell completion must not import torch, lightning or
mlflow: those cost 10-30 s, against about a second for Hydra alone, on every help request and every Tab."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import CONF

ROOT = CONF.rsplit("/", 1)[0]
HEAVY = ("torch", "lightning", "mlflow", "transformers")
# Runs train.py as `python train.py <args>` would, then prints the heavy top-level modules that got imported.
PROBE = ("import runpy, sys\n"
         "sys.argv = ['train.py', *sys.argv[1:]]\n"
         "try:\n"
         "    runpy.run_path('train.py', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         f"print('HEAVY:', ' '.join(m for m in {HEAVY!r} if m in sys.modules))\n")


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["--info"], ["-sc", "query=bash"],
                                  ["router=dopd", "--cfg", "job"]])
def test_cli_answers_without_heavy_imports(args):
    env = {**os.environ, "COMP_LINE": "python train.py rou", "COMP_POINT": "19"}
    res = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    heavy = res.stdout.rsplit("HEAVY:", 1)[-1].split()
    assert not heavy, f"`train.py {' '.join(args)}` imported {heavy}; import them inside the task function"


def test_the_dopd_root_resolver_stays_registered_and_the_package_exports_resolve():
    """`import dopd` is light but still registers ${dopd_root:} and serves its public names on first use."""
    code = ("import sys, dopd; from omegaconf import OmegaConf; "
            "assert OmegaConf.create({'r': '${dopd_root:}'}).r == str(dopd.PROJECT_ROOT); "
            "assert 'torch' not in sys.modules, 'import dopd pulled in torch'; "
            "assert callable(dopd.dopd_loss) and 'HT' in dopd.REGIMES and callable(dopd.topk_divergence)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def test_dopd_train_outside_a_checkout_says_how_to_install(monkeypatch, tmp_path):
    """A non-editable install has dopd/ without train.py beside it: one line saying which install works."""
    import pytest

    import dopd
    from dopd.cli import train_main

    monkeypatch.setattr(dopd, "PROJECT_ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"dopd-train: no train.py at .*pip install -e \."):
        train_main()
