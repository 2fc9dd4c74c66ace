"""dopd: Dual On-policy Distillation and its baselines, as one routing engine inside a Lightning/Hydra harness."""

from pathlib import Path

from omegaconf import OmegaConf

from dopd.divergences import divergence, full_divergence, sampled_divergence, topk_divergence
from dopd.routing import REGIMES, RoutedLoss, RouterSpec, Rule, dopd_loss, dopd_spec, routed_loss

__all__ = ["dopd_loss", "dopd_spec", "routed_loss", "RouterSpec", "Rule", "RoutedLoss", "REGIMES", "divergence",
           "full_divergence", "topk_divergence", "sampled_divergence", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if not OmegaConf.has_resolver("dopd_root"):
    OmegaConf.register_new_resolver("dopd_root", lambda: str(PROJECT_ROOT))
