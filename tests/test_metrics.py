"""No-grad diagnostics: entropy, top-K masses, and the near-uniform-teacher flag."""

import math

import pytest
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


@pytest.mark.parametrize("top_k", (5, 40, 128))  # below, at and above the vocabulary (the last two: masses are 1)
@pytest.mark.parametrize("padded", (True, False))  # with padding the rows are gathered; without, views are read
def test_one_pass_diagnostics_equal_the_per_target_formulas(top_k, padded):
    """step_diagnostics (chunked, one pass) against direct fp64 formulas, on chunks that split the rows unevenly."""
    from dopd.metrics import step_diagnostics

    g = torch.Generator().manual_seed(0)
    s, t1, t2 = (torch.randn(3, 7, 40, generator=g) * 3 for _ in range(3))
    mask = torch.rand(3, 7, generator=g) > (0.3 if padded else -1.0)
    entropy, d = step_diagnostics(s, {"teacher": t1, "student_priv": t2}, mask, top_k=top_k, chunk_size=4)
    log_s = torch.log_softmax(s[mask].double(), -1)
    assert abs(float(entropy) - float(-(log_s.exp() * log_s).sum(-1).mean())) < 1e-5
    idx = log_s.topk(min(top_k, 40), -1).indices
    for name, t in (("teacher", t1), ("student_priv", t2)):
        log_t = torch.log_softmax(t[mask].double(), -1)
        assert abs(d[f"diag/{name}/student_topk_mass"] - float(log_s.exp().gather(-1, idx).sum(-1).mean())) < 1e-5
        assert abs(d[f"diag/{name}/target_topk_mass"] - float(log_t.exp().gather(-1, idx).sum(-1).mean())) < 1e-5
        ratio = float(-(log_t.exp() * log_t).sum(-1).mean()) / math.log(40)
        assert abs(d[f"diag/{name}/entropy_ratio"] - ratio) < 1e-5
