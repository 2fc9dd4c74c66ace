"""Console scripts: `dopd-train` is `python train.py` from anywhere (same Hydra config tree in conf/)."""

from __future__ import annotations

import runpy
import sys

import dopd


def train_main() -> None:
    script = str(dopd.PROJECT_ROOT / "train.py")
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")
