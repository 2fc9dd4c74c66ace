"""Greedy (pass@1) and sampled (pass@k) accuracy of a model on held-out prompts, per split and per domain.

Shared by the distillation module (the student, without p) and the SFT stage that builds the zoo (each model,
with and without p), so both report the same numbers under the same names.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from dopd.rollout import sample
from dopd.tasks.base import Example


@torch.no_grad()
def outcomes(model, view, task, examples: list[Example], *, privileged: bool = False, max_new_tokens: int = 64,
             batch_size: int = 256, k: int = 1, temperature: float = 1.0, engine: str = "auto") -> tuple[list[bool], list[float]]:
    """Per example: solved (greedy when k == 1; any of k samples when k > 1) and the mean response length."""
    solved, lengths = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        roll = sample(model, view, chunk, privileged=privileged, do_sample=k > 1, max_new_tokens=max_new_tokens,
                      n=k, temperature=temperature, engine=engine)
        ok = torch.tensor([task.is_correct(t, ex) for t, ex in zip(roll.texts, roll.examples)]).view(len(chunk), k)
        solved += ok.any(-1).tolist()
        lengths += roll.lengths.float().view(len(chunk), k).mean(-1).tolist()
    return solved, lengths


def domain_rows(examples: list[Example]) -> dict[str, list[int]]:
    """Row indices overall (key "") and per domain (key "/<domain>") when the examples span several domains."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[f"/{ex.domain}"].append(i)
    return {"": list(range(len(examples))), **(dict(sorted(groups.items())) if len(groups) > 1 else {})}


def accuracy_table(model, view, task, evals: dict[str, list[Example]], *, prefix: str = "acc",
                   privileged: bool = False, **kwargs) -> dict[str, float]:
    """`<prefix>/<split>` and `<prefix>/<split>/<domain>` for every split, plus `<prefix>/avg` over splits."""
    out = {}
    for split, exs in evals.items():
        solved, _ = outcomes(model, view, task, exs, privileged=privileged, **kwargs)
        for domain, rows in domain_rows(exs).items():
            out[f"{prefix}/{split}{domain}"] = sum(solved[i] for i in rows) / max(1, len(rows))
    splits = [out[f"{prefix}/{s}"] for s in evals]
    if splits:
        out[f"{prefix}/avg"] = sum(splits) / len(splits)
    return out
