"""Correctness of dopd.divergences: an independent fp64 reference, TRL parity, mathematical properties, gradchecks,
and the unbiasedness of the sampled-token estimator (exactly, by enumeration, and by Monte Carlo).

Every check compares against a tolerance, never a bare `> 0`, and each can fail.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dopd.divergences import (divergence, divergence_from_logprobs, full_divergence, full_divergence_unchunked,
                              sampled_divergence, topk_divergence)

try:  # tests/ is on sys.path under pytest's default (prepend) import mode; fall back when tests/ is a package
    import reference as ref
except ImportError:  # pragma: no cover
    from tests import reference as ref

DIVS = ("fkl", "rkl", "js")
BETAS = (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)
LN2 = math.log(2.0)


def logits(seed: int, n: int, v: int, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


# -- 1. against the independent fp64 reference -----------------------------------------------------------------
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("beta", (0.0, 0.3, 0.5, 1.0))
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_full_matches_reference(div, beta, temperature):
    s, t = logits(1, 9, 23), logits(2, 9, 23)
    ours = full_divergence(s, t, div, beta, temperature, chunk_size=4)
    assert ours.dtype == torch.float32 and ours.shape == (9,)
    expected = ref.rows(ref.full_row, s, t, div, beta, temperature)
    close(ours, expected, atol=1e-5, rtol=1e-5)
    g_ours = grad_of(lambda x: full_divergence(x, t, div, beta, temperature, chunk_size=4), s)
    g_ref = grad_of(lambda x: ref.rows(ref.full_row, x, t, div, beta, temperature), s.double())
    close(g_ours, g_ref, atol=1e-5)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("support", ("student", "target"))
@pytest.mark.parametrize("tail", (False, True))
@pytest.mark.parametrize("k", (1, 5, 40))
def test_topk_matches_reference(div, support, tail, k):
    s, t = logits(3, 7, 29), logits(4, 7, 29)
    ours = topk_divergence(s, t, div, k, beta=0.4, support=support, tail=tail)
    expected = ref.rows(ref.topk_row, s, t, div, k, 0.4, support, tail)
    close(ours, expected, atol=1e-5, rtol=1e-5)
    g_ours = grad_of(lambda x: topk_divergence(x, t, div, k, 0.4, support, tail), s)
    g_ref = grad_of(lambda x: ref.rows(ref.topk_row, x, t, div, k, 0.4, support, tail), s.double())
    close(g_ours, g_ref, atol=1e-5)


@pytest.mark.parametrize("div,beta", [("rkl", 0.5), ("fkl", 0.5), ("js", 0.0), ("js", 0.3), ("js", 0.5),
                                      ("js", 1.0)])
def test_sampled_value_matches_reference(div, beta):
    s, t = logits(5, 11, 13), logits(6, 11, 13)
    tokens = torch.arange(11) % 13
    ours = sampled_divergence(s, t, tokens, div, beta)
    expected = torch.tensor([ref.sampled_value(s[i].double(), t[i].double(), int(tokens[i]), div, beta)
                             for i in range(11)], dtype=torch.float64)
    close(ours, expected, atol=1e-5, rtol=1e-5)


def test_dispatch_and_validation():
    s, t = logits(7, 4, 10), logits(8, 4, 10)
    tok = torch.zeros(4, dtype=torch.long)
    close(divergence(s, t, tok, divergence="js", scope="full"), full_divergence(s, t, "js"), atol=0)
    close(divergence(s, t, tok, divergence="rkl", scope="topk", top_k=3), topk_divergence(s, t, "rkl", 3), atol=0)
    close(divergence(s, t, tok, divergence="fkl", scope="sampled"), sampled_divergence(s, t, tok, "fkl"), atol=0)
    with pytest.raises(ValueError, match="scope"):
        divergence(s, t, tok, divergence="js", scope="dense")
    with pytest.raises(ValueError, match="divergence"):
        full_divergence(s, t, "tv")
    with pytest.raises(ValueError, match="beta"):
        full_divergence(s, t, "js", beta=1.5)
    with pytest.raises(ValueError, match="top_k"):
        topk_divergence(s, t, "rkl", 0)
    with pytest.raises(ValueError, match="support"):
        topk_divergence(s, t, "rkl", 3, support="union")


# -- 2. parity with TRL's GKDTrainer.generalized_jsd_loss (trl==1.16.0) -------------------------------------------
@pytest.fixture(scope="module")
def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    gkd = pytest.importorskip("trl.experimental.gkd")  # trl >= 0.26 moved GKD here; `from trl import GKDTrainer` fails
    return gkd.GKDTrainer.generalized_jsd_loss


def ours_trl_reduced(s, t, labels, beta, temperature, num_items=None, div="js"):
    """Our per-token full divergence, reduced the way TRL reduces its element-wise tensor.

    With labels: vocab-summed, summed over valid (!= -100) tokens, divided by max(1, #valid).
    Without labels ('batchmean'): summed over all tokens, divided by the batch size B (not B*T).
    With num_items_in_batch: the plain sum divided by it.
    """
    B, T, V = s.shape
    rows_s, rows_t = s.reshape(-1, V), t.reshape(-1, V)
    if labels is not None:
        keep = labels.reshape(-1) != -100
        rows_s, rows_t = rows_s[keep], rows_t[keep]
    total = full_divergence(rows_s, rows_t, div, beta, temperature, chunk_size=5).sum()
    if num_items is not None:
        return total / num_items
    if labels is not None:
        return total / max(1, int((labels != -100).sum()))
    return total / B


def make_labels(kind: str, B: int, T: int, V: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, V, (B, T), generator=g)
    if kind == "partial":
        labels[0, :2] = -100
        labels[-1, -1] = -100
        labels[1 % B, :] = -100
    else:  # all masked
        labels[:] = -100
    return labels


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("label_kind", ("none", "partial", "all_masked"))
def test_trl_generalized_jsd_parity(trl_jsd, beta, temperature, label_kind):
    B, T, V = 3, 5, 11
    s = logits(20, B * T, V, scale=3.0).view(B, T, V)
    t = logits(21, B * T, V, scale=3.0).view(B, T, V)
    labels = make_labels(label_kind, B, T, V)

    s_trl = s.clone().requires_grad_(True)
    theirs = trl_jsd(s_trl, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    s_ours = s.clone().requires_grad_(True)
    ours = ours_trl_reduced(s_ours, t, labels, beta, temperature)
    close(ours, theirs, atol=1e-6, rtol=1e-5)
    if label_kind == "all_masked":
        close(ours, torch.tensor(0.0), atol=0)
    else:
        assert float(theirs.detach()) > 1e-3  # a non-degenerate comparison

    # TRL's endpoints: beta=0 is forward KL(T||S), beta=1 is reverse KL(S||T) (special cases, not limits).
    if beta in (0.0, 1.0):
        plain = ours_trl_reduced(s, t, labels, beta, temperature, div="fkl" if beta == 0.0 else "rkl")
        close(plain, theirs, atol=1e-6, rtol=1e-5)

    if label_kind != "all_masked":
        theirs.backward()
        ours.backward()
        close(s_ours.grad, s_trl.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_trl_parity_num_items_and_large_vocab(trl_jsd, beta):
    B, T, V = 2, 3, 32000
    s = logits(22, B * T, V, scale=4.0).view(B, T, V)
    t = logits(23, B * T, V, scale=4.0).view(B, T, V)
    labels = make_labels("partial", B, T, V)
    theirs = trl_jsd(s, t, labels=labels, beta=beta)
    close(ours_trl_reduced(s, t, labels, beta, 1.0), theirs, atol=1e-6, rtol=1e-5)
    theirs = trl_jsd(s, t, labels=labels, beta=beta, num_items_in_batch=7)
    close(ours_trl_reduced(s, t, labels, beta, 1.0, num_items=7), theirs, atol=1e-6, rtol=1e-5)


# -- 3. properties ------------------------------------------------------------------------------------------------
def all_scopes(s, t, div, beta=0.5):
    """Every non-sampled scope variant, as (name, values)."""
    return [("full", full_divergence(s, t, div, beta)),
            ("topk", topk_divergence(s, t, div, 4, beta)),
            ("topk_target", topk_divergence(s, t, div, 4, beta, support="target")),
            ("topk_tail", topk_divergence(s, t, div, 4, beta, tail=True)),
            ("topk_tail_target", topk_divergence(s, t, div, 4, beta, support="target", tail=True))]


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("beta", (0.1, 0.5, 0.9))
def test_nonnegative(div, beta):
    s, t = logits(30, 64, 12, scale=3.0), logits(31, 64, 12, scale=3.0)
    for name, v in all_scopes(s, t, div, beta):
        assert float(v.min()) >= -1e-6, name
        assert float(v.max()) >= 1e-2, name  # not vacuously zero


@pytest.mark.parametrize("div", DIVS)
def test_zero_when_student_equals_target(div):
    s = logits(32, 16, 12, scale=3.0)
    shifted = s + 5.0  # the same distribution
    tokens = torch.arange(16) % 12
    for target in (s.clone(), shifted):
        for name, v in all_scopes(s, target, div) + [("sampled", sampled_divergence(s, target, tokens, div))]:
            close(v, torch.zeros(16), atol=2e-6)
    uniform = torch.zeros(3, 12)
    close(full_divergence(uniform, uniform + 1.0, div), torch.zeros(3), atol=1e-7)


def test_js_half_bounded_by_ln2():
    s, t = logits(33, 200, 17, scale=5.0), logits(34, 200, 17, scale=5.0)
    js = full_divergence(s, t, "js", 0.5)
    assert float(js.max()) <= LN2 + 1e-6
    # very peaked, disagreeing distributions approach the bound
    peaked_s = torch.full((2, 17), -60.0)
    peaked_t = torch.full((2, 17), -60.0)
    peaked_s[:, 0], peaked_t[:, 1] = 60.0, 60.0
    extreme = full_divergence(peaked_s, peaked_t, "js", 0.5)
    assert float(extreme.max()) <= LN2 + 1e-6
    assert float(extreme.min()) >= LN2 - 1e-5


@pytest.mark.parametrize("beta", BETAS)
def test_js_argument_swap_mirrors_beta(beta):
    s, t = logits(35, 20, 15, scale=3.0), logits(36, 20, 15, scale=3.0)
    close(full_divergence(s, t, "js", beta), full_divergence(t, s, "js", 1.0 - beta), atol=2e-6, rtol=1e-5)
    if beta not in (0.5,):  # asymmetric elsewhere: the check above is not vacuous
        assert float((full_divergence(s, t, "js", beta) - full_divergence(t, s, "js", beta)).abs().max()) > 1e-3


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temperature", (0.5, 2.0))
def test_temperature_is_logit_scaling(div, temperature):
    s, t = logits(37, 10, 14, scale=3.0), logits(38, 10, 14, scale=3.0)
    tokens = torch.arange(10)
    pairs = [
        (full_divergence(s, t, div, 0.3, temperature), full_divergence(s / temperature, t / temperature, div, 0.3)),
        (topk_divergence(s, t, div, 5, 0.3, temperature=temperature),
         topk_divergence(s / temperature, t / temperature, div, 5, 0.3)),
        (topk_divergence(s, t, div, 5, 0.3, support="target", tail=True, temperature=temperature),
         topk_divergence(s / temperature, t / temperature, div, 5, 0.3, support="target", tail=True)),
        (sampled_divergence(s, t, tokens, div, 0.3, temperature),
         sampled_divergence(s / temperature, t / temperature, tokens, div, 0.3)),
    ]
    for a, b in pairs:
        close(a, b, atol=1e-6, rtol=1e-5)
    assert float((full_divergence(s, t, div, 0.3, temperature) - full_divergence(s, t, div, 0.3)).abs().max()) > 1e-3


@pytest.mark.parametrize("fn", [
    pytest.param(lambda x, t: full_divergence(x, t, "js", 0.5, chunk_size=2), id="full-js"),
    pytest.param(lambda x, t: full_divergence(x, t, "js", 0.2, temperature=1.7), id="full-js-b0.2-temp"),
    pytest.param(lambda x, t: full_divergence(x, t, "rkl", chunk_size=2), id="full-rkl"),
    pytest.param(lambda x, t: full_divergence(x, t, "fkl", temperature=0.7, chunk_size=2), id="full-fkl-temp"),
    pytest.param(lambda x, t: full_divergence(x, t, "js", 0.0, chunk_size=2), id="full-js-b0"),
    pytest.param(lambda x, t: full_divergence(x, t, "js", 1.0, temperature=1.3), id="full-js-b1-temp"),
    pytest.param(lambda x, t: topk_divergence(x, t, "js", 3, 0.5), id="topk-js"),
    pytest.param(lambda x, t: topk_divergence(x, t, "rkl", 3), id="topk-rkl"),
    pytest.param(lambda x, t: topk_divergence(x, t, "rkl", 3, tail=True), id="topk-rkl-tail"),
    pytest.param(lambda x, t: topk_divergence(x, t, "js", 3, 0.5, support="target", tail=True), id="topk-js-tail-t"),
])
def test_gradcheck_fp64(fn):
    s = logits(40, 3, 7, dtype=torch.float64).requires_grad_(True)
    t = logits(41, 3, 7, dtype=torch.float64)
    assert fn(s, t).dtype == torch.float64  # fp64 in, fp64 math (no silent fp32 downcast)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("div,beta", [("rkl", 0.5), ("fkl", 0.5), ("js", 0.5), ("js", 0.0), ("js", 1.0)])
def test_full_gradient_survives_a_second_backward(div, beta):
    """The fused full divergence hands its precomputed gradient to the first backward (scaled in place); a second
    backward through a retained graph recomputes it, so both equal autograd on the plain formula."""
    s, t = logits(44, 6, 13, scale=3.0), logits(45, 6, 13, scale=3.0)
    w = torch.linspace(0.5, 2.0, 6)
    x = s.clone().requires_grad_(True)
    out = (full_divergence(x, t, div, beta, temperature=1.3, chunk_size=4) * w).sum()
    first = torch.autograd.grad(out, x, retain_graph=True)[0]
    second = torch.autograd.grad(out, x)[0]
    y = s.clone().requires_grad_(True)
    expected = torch.autograd.grad((full_divergence_unchunked(y, t, div, beta, 1.3) * w).sum(), y)[0]
    close(first, expected, atol=1e-6, rtol=1e-5)
    close(second, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("div", DIVS)
def test_chunked_equals_unchunked(div):
    s, t = logits(42, 11, 19, scale=3.0), logits(43, 11, 19, scale=3.0)
    weights = torch.linspace(0.5, 2.0, 11)  # a non-uniform upstream gradient
    grads, values = [], []
    for chunk in (1, 3, 4, 1024):
        x = s.clone().requires_grad_(True)
        v = full_divergence(x, t, div, 0.3, chunk_size=chunk)
        (v * weights).sum().backward()
        values.append(v.detach())
        grads.append(x.grad)
    for v, g in zip(values[:-1], grads[:-1]):
        close(v, values[-1], atol=1e-7, rtol=1e-6)
        close(g, grads[-1], atol=1e-7, rtol=1e-6)
    close(full_divergence(s[:0], t[:0], div), torch.zeros(0), atol=0)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("support", ("student", "target"))
def test_topk_with_k_at_least_vocab_is_full(div, support):
    s, t = logits(44, 12, 9, scale=3.0), logits(45, 12, 9, scale=3.0)
    full = full_divergence(s, t, div, 0.3)
    for k in (9, 50):
        close(topk_divergence(s, t, div, k, 0.3, support=support), full, atol=1e-6, rtol=1e-5)
        close(topk_divergence(s, t, div, k, 0.3, support=support, tail=True), full, atol=1e-5, rtol=1e-5)
        g_top = grad_of(lambda x: topk_divergence(x, t, div, k, 0.3, support=support), s)
        g_full = grad_of(lambda x: full_divergence(x, t, div, 0.3), s)
        close(g_top, g_full, atol=1e-6, rtol=1e-5)


def test_tail_bucket_topk_fkl_is_a_lower_bound_increasing_in_k():
    """Coarse-graining never increases a KL: the (K+1)-bucket forward KL on the target's top-K is <= the full one,
    grows with K (the partitions refine each other) and equals it at K = V."""
    V = 24
    s, t = logits(46, 30, V, scale=3.0), logits(47, 30, V, scale=3.0)
    full = full_divergence(s, t, "fkl")
    prev = torch.zeros_like(full)
    for k in (1, 2, 4, 8, 16, 23, V):
        v = topk_divergence(s, t, "fkl", k, support="target", tail=True)
        assert float((v - full).max()) <= 1e-5, k
        assert float((prev - v).max()) <= 1e-5, k
        prev = v
    close(prev, full, atol=1e-5, rtol=1e-5)
    # the bound is not vacuous: at small K it is strict
    assert float((full - topk_divergence(s, t, "fkl", 2, support="target", tail=True)).min()) > 1e-3


def test_divergence_from_logprobs_on_a_known_pair():
    """TRL's two-token check: p = [.1, .9], q = [.9, .1]: KL(p||q) = KL(q||p) = 0.8 ln 9."""
    p, q = torch.tensor([[0.1, 0.9]]).log(), torch.tensor([[0.9, 0.1]]).log()
    expected = torch.tensor([0.8 * math.log(9.0)])
    close(divergence_from_logprobs(p, q, "rkl"), expected, atol=1e-6)
    close(divergence_from_logprobs(p, q, "fkl"), expected, atol=1e-6)
    # JS(0.5): M = [.5, .5] and both KL(p||M), KL(q||M) equal .1 ln .2 + .9 ln 1.8
    js = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)
    close(divergence_from_logprobs(p, q, "js", 0.5), torch.tensor([js]), atol=1e-6)


# -- 9. the sampled-token estimator: unbiased value and gradient --------------------------------------------------
S0 = torch.tensor([[0.5, -0.3, 1.0, 0.0, -1.0]])
T0 = torch.tensor([[-1.5, 1.5, 0.2, -1.0, 1.0]])
SAMPLED_CASES = [("rkl", 0.5), ("fkl", 0.5), ("js", 0.5), ("js", 0.1), ("js", 0.9), ("js", 0.0), ("js", 1.0)]


def full_value_and_grad(div, beta):
    x = S0.clone().requires_grad_(True)
    v = full_divergence(x, T0, div, beta)
    v.sum().backward()
    return v.detach()[0], x.grad[0]


@pytest.mark.parametrize("div,beta", SAMPLED_CASES)
def test_sampled_estimator_is_exactly_unbiased(div, beta):
    """E_{y~S}[value(y)] = D and E_{y~S}[grad(y)] = grad D, by enumerating the V outcomes with weights S(y)."""
    V = S0.shape[-1]
    x = S0.expand(V, V).clone().requires_grad_(True)
    est = sampled_divergence(x, T0.expand(V, V), torch.arange(V), div, beta)
    weights = torch.softmax(S0[0].double(), -1).float()
    (weights * est).sum().backward()
    value, grad = full_value_and_grad(div, beta)
    close((weights * est.detach()).sum(), value, atol=1e-6, rtol=1e-5)
    close(x.grad.sum(0), grad, atol=1e-6, rtol=1e-5)
    assert float(grad.norm()) > 0.02  # the check compares non-trivial gradients


@pytest.mark.parametrize("div,beta", [("rkl", 0.5), ("fkl", 0.5), ("js", 0.5)])
def test_sampled_estimator_monte_carlo(div, beta):
    n = 200_000
    g = torch.Generator().manual_seed(123)
    y = torch.multinomial(torch.softmax(S0[0], -1), n, replacement=True, generator=g)
    x = S0.clone().requires_grad_(True)
    est = sampled_divergence(x.expand(n, -1), T0.expand(n, -1), y, div, beta)
    est.mean().backward()
    value, grad = full_value_and_grad(div, beta)
    close(est.detach().mean(), value, atol=0.02, rtol=0.02)
    close(x.grad[0], grad, atol=0.02, rtol=0.02)
    assert float(grad.norm()) > 0.05


def test_action_independent_penalty_has_zero_expected_gradient():
    """Negative control for the estimator: an advantage that does not depend on the sampled token (here the
    detached top-K KL value of the row) times log S(y) has zero expected gradient, so it teaches nothing."""
    n = 200_000
    g = torch.Generator().manual_seed(7)
    y = torch.multinomial(torch.softmax(S0[0], -1), n, replacement=True, generator=g)
    x = S0.clone().requires_grad_(True)
    rows_x = x.expand(n, -1)
    penalty = topk_divergence(rows_x, T0.expand(n, -1), "rkl", 3).detach()
    assert float(penalty.min()) > 0.05  # a sizeable penalty
    log_s = torch.log_softmax(rows_x, -1).gather(-1, y[:, None]).squeeze(-1)
    (penalty * log_s).mean().backward()
    assert float(x.grad.norm()) < 0.02
    # exactly zero in expectation (enumeration)
    V = S0.shape[-1]
    x2 = S0.expand(V, V).clone().requires_grad_(True)
    pen = topk_divergence(x2, T0.expand(V, V), "rkl", 3).detach()
    w = torch.softmax(S0[0], -1)
    (w * pen * torch.log_softmax(x2, -1).diagonal()).sum().backward()
    assert float(x2.grad.sum(0).norm()) < 1e-6  # rows are the V outcomes; their weighted sum is the expectation
    # while the real estimator's expected gradient is large
    assert float(full_value_and_grad("rkl", 0.5)[1].norm()) > 0.1


@pytest.mark.parametrize("div", ["rkl", "fkl", "js"])
def test_shared_minus_inf_entries_give_finite_values_and_grads(div):
    """Vocabulary entries masked to -inf on both sides (e.g. padded vocab rows) must not produce NaN."""
    s = torch.randn(3, 7, dtype=torch.float64)
    t = torch.randn(3, 7, dtype=torch.float64)
    s[:, 2] = t[:, 2] = float("-inf")
    s.requires_grad_(True)
    v = full_divergence(s, t, div)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(s.grad).all()
    ref = full_divergence(s.detach()[:, [0, 1, 3, 4, 5, 6]], t[:, [0, 1, 3, 4, 5, 6]], div)
    torch.testing.assert_close(v.detach(), ref)
