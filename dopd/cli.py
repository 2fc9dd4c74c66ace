"""Console scripts: `dopd-train` is `python train.py` from anywhere (same Hydra config tree in conf/)."""

from __future__ import annotations

import runpy
import sys

import dopd


def train_main() -> None:
    script = dopd.PROJECT_ROOT / "train.py"
    if not script.exists():  # a non-editable `pip install .` copies dopd/ alone, without conf/, zoo/ and train.py
        raise SystemExit(f"dopd-train: no train.py at {dopd.PROJECT_ROOT}: it runs from a checkout of the repository; "
                         "install that editable (`pip install -e .`, as `make install` does)")
    script = str(script)
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")
