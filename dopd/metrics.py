"""Small no-grad diagnostics of a batch of logits."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits) over masked-in positions, in fp32 chunks of rows."""
    return step_diagnostics(logits, {}, mask, top_k=1, chunk_size=chunk_size)[0]


@torch.no_grad()
def distillation_diagnostics(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], mask: torch.Tensor,
                             top_k: int, chunk_size: int = 1024) -> dict[str, float]:
    """Per target pass: its mass and the student's on the student's top-K support, and its normalised entropy.

    `<target>/entropy_ratio` is the target's mean entropy over log V: near 1 the teacher is near-uniform (broken or
    unloaded weights; JS then starts near ln 2 and drags the student toward uniform), flagged by `near_uniform`.
    """
    return step_diagnostics(student_logits, targets, mask, top_k, chunk_size)[1]


@torch.no_grad()
def step_diagnostics(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], mask: torch.Tensor, top_k: int,
                     chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's mean entropy and `distillation_diagnostics`, in one pass over the masked rows.

    Each chunk's student log-softmax and top-K indices are computed once for every target, and the sums stay on
    the device until one host copy at the end (one sync per step on a GPU, not one per chunk and target). At a
    large vocabulary this runs every step, so it avoids whole passes where it can: no copy of the rows when every
    position is a response token, row dot products for the entropies, and no top-K when K covers the vocabulary.
    """
    vocab = student_logits.shape[-1]
    sel = mask.bool()
    no_padding = bool(sel.all())  # then read views of the rows, not copies
    pick = (lambda x: x.detach().reshape(-1, vocab)) if no_padding else (lambda x: x.detach()[sel])
    s, rows = pick(student_logits), {name: pick(t) for name, t in targets.items()}
    n = s.shape[0]
    if n == 0:
        return torch.tensor(0.0, device=student_logits.device), {}
    k = min(top_k, vocab)
    whole = k >= vocab  # the top-K is the whole vocabulary: both masses are 1 by definition
    sums = torch.zeros(1 + 3 * len(rows), dtype=torch.float32, device=s.device)  # entropy, then 3 per target
    for start in range(0, n, chunk_size):
        log_s = torch.log_softmax(s[start : start + chunk_size].float(), -1)
        p_s = log_s.exp()
        sums[0] -= _row_dot(p_s, log_s).sum()
        if not rows:
            continue
        idx = None if whole else log_s.topk(k, dim=-1).indices
        s_mass = log_s.shape[0] if whole else p_s.gather(-1, idx).sum()
        for i, t in enumerate(rows.values()):
            log_t = torch.log_softmax(t[start : start + chunk_size].float(), -1)
            sums[1 + 3 * i] += s_mass
            sums[2 + 3 * i] += log_t.shape[0] if whole else log_t.gather(-1, idx).exp().sum()
            sums[3 + 3 * i] -= _row_dot(log_t.exp(), log_t).sum()
    entropy = sums[0] / n
    values = (sums[1:] / n).tolist()
    out: dict[str, float] = {}
    for i, name in enumerate(rows):
        s_mass, t_mass, ent = values[3 * i : 3 * i + 3]
        ratio = ent / math.log(vocab) if vocab > 1 else 0.0
        out.update({f"diag/{name}/student_topk_mass": s_mass, f"diag/{name}/target_topk_mass": t_mass,
                    f"diag/{name}/entropy_ratio": ratio, f"diag/{name}/near_uniform": float(ratio > 0.95)})
    return entropy, out


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row sum of a * b without the [rows, V] product (2-3x faster than (a * b).sum(-1) at V=32000 on CPU)."""
    return torch.einsum("ij,ij->i", a, b)
