"""No-grad diagnostics: entropy, top-K masses, and the near-uniform-teacher flag."""

import math

import torch

from dopd.metrics import distillation_diagnostics, masked_entropy


def test_uniform_teacher_is_flagged_and_a_peaked_one_is_not():
    s = torch.randn(2, 5, 50)
    mask = torch.ones(2, 5, dtype=torch.bool)
    peaked = torch.zeros(2, 5, 50)
    peaked[..., 3] = 20.0
    d = distillation_diagnostics(s, {"teacher": torch.zeros(2, 5, 50), "teacher_priv": peaked}, mask, top_k=4)
    assert d["diag/teacher/near_uniform"] == 1.0 and abs(d["diag/teacher/entropy_ratio"] - 1) < 1e-5
    assert d["diag/teacher_priv/near_uniform"] == 0.0 and d["diag/teacher_priv/entropy_ratio"] < 0.01
    assert abs(d["diag/teacher/target_topk_mass"] - 4 / 50) < 1e-5
    assert 0 < d["diag/teacher/student_topk_mass"] <= 1


def test_masked_entropy_ignores_masked_positions():
    logits = torch.zeros(1, 3, 8)
    logits[0, 2] = torch.tensor([50.0] + [0.0] * 7)  # a peaked position, masked out below
    mask = torch.tensor([[True, True, False]])
    assert abs(float(masked_entropy(logits, mask)) - math.log(8)) < 1e-5
    assert float(masked_entropy(logits, torch.zeros_like(mask))) == 0.0
