"""dopd: Dual On-policy Distillation and its baselines, as one routing engine inside a Lightning/Hydra harness.

Importing the package is light (it registers the `${dopd_root:}` resolver that conf/ uses); the torch-based public
names below load on first use, so `python train.py --help` and shell completion do not wait for torch.
"""

from importlib import import_module
from pathlib import Path

from dopd.settings import NOT_A_RESULT

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

# Run folders: a per-process token beside the timestamp, so two launches in the same second never share a folder
# (and one job's last.ckpt never overwrites another's); sweep subfolders name their job's overrides, made safe.
_LAUNCH_ID = __import__("secrets").token_hex(3)


def safe_dirname(text: str, limit: int = 80) -> str:
    """`text` as one folder name: no '/' or odd characters, at most `limit` characters (cut names end with a hash
    of the whole, so they stay unique); '' stays ''."""
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", str(text))
    if len(name) > limit:
        name = name[: limit - 9] + "~" + hashlib.sha1(str(text).encode()).hexdigest()[:8]
    return name


# Left out of sweep folder names: where outputs and the store go, and settings that change no result.
_NOT_IN_DIRNAME = tuple(k + "." if k in ("paths", "logger", "hydra") else k for k in NOT_A_RESULT)


def job_dirname(limit: int = 80) -> str:
    """A sweep job's folder name: its overrides, the swept ones first (so a cut name still says what varies),
    then the others sorted; made safe by safe_dirname."""
    import os

    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    swept = set(filter(None, os.environ.get("DOPD_SWEEP_KEYS", "").split(",")))  # dopd.tracking.SWEEP_KEYS_ENV

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    keep = [o for o in overrides if not any(key(o) == x or key(o).startswith(x) for x in _NOT_IN_DIRNAME)]
    ordered = [o for o in keep if key(o) in swept] + sorted(o for o in keep if key(o) not in swept)
    return safe_dirname(",".join(ordered), limit)


if not OmegaConf.has_resolver("dopd_launch_id"):
    OmegaConf.register_new_resolver("dopd_launch_id", lambda: _LAUNCH_ID)
if not OmegaConf.has_resolver("dopd_job_dirname"):
    OmegaConf.register_new_resolver("dopd_job_dirname", lambda limit=80: job_dirname(int(limit)))
