"""The pieces of `scripts/bench.py`, one idea per module; the driver (`scripts/bench.py`: its CLI, the plan, the run)
puts them together.

    workloads       the random-init teacher/student pairs and their prompts (PairSpec, PAIRS, build_workload)
    clocks          timers, peak memory, the machine, its matmul peak and the student's FLOP count
    routers         one training step piece by piece, per router (the step breakdown)
    lightning_step  the full Lightning step (`DistillModule` under `lightning.Trainer`)
    trl_gkd         TRL's `GKDTrainer` side by side
    loss            chunked vs naive full-vocabulary JS, each in a fresh subprocess (the driver's --_loss-worker)
    ablations       what the built-in optimisations buy (before/after)
    step_rollouts   one step's rollouts in one call vs one call per micro-batch
    report          the headline figures, the targets, the printed report and the JSON file
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DRIVER = ROOT / "scripts" / "bench.py"  # the loss worker's subprocess runs `DRIVER --_loss-worker CFG`
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


