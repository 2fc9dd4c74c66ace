"""Small no-grad diagnostics of a batch of logits."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits) over masked-in positions, in fp32 chunks of rows."""
    from dopd.routing import token_entropy

    mask = mask.bool()
    if not mask.any():
        return torch.tensor(0.0, device=logits.device)
    return token_entropy(logits, chunk_size)[mask].mean()


@torch.no_grad()
def distillation_diagnostics(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], mask: torch.Tensor,
                             top_k: int, chunk_size: int = 1024) -> dict[str, float]:
    """Per target pass: its mass and the student's on the student's top-K support, and its normalised entropy.

    `<target>/entropy_ratio` is the target's mean entropy over log V: near 1 the teacher is near-uniform (broken or
    unloaded weights; JS then starts near ln 2 and drags the student toward uniform), flagged by `near_uniform`.
    """
    sel = mask.bool()
    s = student_logits[sel]
    out: dict[str, float] = {}
    if s.shape[0] == 0:
        return out
    vocab = s.shape[-1]
    k = min(top_k, vocab)
    for name, logits in targets.items():
        t = logits[sel]
        s_mass = t_mass = ent = 0.0
        for sp, tp in zip(s.split(chunk_size), t.split(chunk_size)):
            log_s, log_t = torch.log_softmax(sp.float(), -1), torch.log_softmax(tp.float(), -1)
            idx = log_s.topk(k, dim=-1).indices
            s_mass += float(log_s.gather(-1, idx).exp().sum())
            t_mass += float(log_t.gather(-1, idx).exp().sum())
            ent += float(-(log_t.exp() * log_t).sum())
        n = s.shape[0]
        ratio = ent / n / math.log(vocab) if vocab > 1 else 0.0
        out.update({f"diag/{name}/student_topk_mass": s_mass / n, f"diag/{name}/target_topk_mass": t_mass / n,
                    f"diag/{name}/entropy_ratio": ratio, f"diag/{name}/near_uniform": float(ratio > 0.95)})
    return out
