"""dopd: Dual On-policy Distillation and its baselines, as one routing engine inside a Lightning/Hydra harness.

Importing the package is light (it registers the `${dopd_root:}` resolver that conf/ uses); the torch-based public
names below load on first use, so `python train.py --help` and shell completion do not wait for torch.
"""

from importlib import import_module
from pathlib import Path

from omegaconf import OmegaConf

_LAZY = {"divergence": "dopd.divergences", "full_divergence": "dopd.divergences", "topk_divergence": "dopd.divergences",
         "sampled_divergence": "dopd.divergences", "REGIMES": "dopd.routing", "RoutedLoss": "dopd.routing",
         "RouterSpec": "dopd.routing", "Rule": "dopd.routing", "dopd_loss": "dopd.routing", "dopd_spec": "dopd.routing",
         "routed_loss": "dopd.routing"}

__all__ = ["dopd_loss", "dopd_spec", "routed_loss", "RouterSpec", "Rule", "RoutedLoss", "REGIMES", "divergence",
           "full_divergence", "topk_divergence", "sampled_divergence", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if not OmegaConf.has_resolver("dopd_root"):
    OmegaConf.register_new_resolver("dopd_root", lambda: str(PROJECT_ROOT))


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dopd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
