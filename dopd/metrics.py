"""Small no-grad diagnostics of a batch of logits."""

from __future__ import annotations

import torch


@torch.no_grad()
def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Mean entropy (nats) of softmax(logits) over masked-in positions, in fp32 chunks of rows."""
    rows = logits[mask.bool()]
    if rows.shape[0] == 0:
        return torch.tensor(0.0, device=logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for part in rows.split(chunk_size):
        logp = torch.log_softmax(part.float(), dim=-1)
        total += -(logp.exp() * logp).sum()
    return total / rows.shape[0]
