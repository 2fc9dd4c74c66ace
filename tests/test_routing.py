"""Correctness of dopd.routing: the DOPD loss contract against an independent fp64 reference, regime assignment
(exhaustive, exclusive, ties, threshold monotonicity), gradient isolation, per-regime gradients, masking edge cases,
gradient-accumulation invariance and router-spec validation.

Every check compares against a tolerance, never a bare `> 0`, and each can fail.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dopd.divergences import divergence
from dopd.routing import (REGIMES, Gap, GapSpec, PruneSpec, Rule, RouterSpec, assign_regimes, dopd_loss, dopd_spec,
                          routed_loss, sampled_logprob, trimmed_mean)

try:  # tests/ is on sys.path under pytest's default (prepend) import mode; fall back when tests/ is a package
    import reference as ref
except ImportError:  # pragma: no cover
    from tests import reference as ref

LH, LL, HT, HS = range(4)


def make_batch(seed, B, T, V, *, scale=2.5, keep_p=0.8, empty_rows=(), dtype=torch.float32):
    """Random logits for the three passes, tokens sampled on-policy from the (unprivileged) student, a partial mask.

    The privileged student is correlated with the student (same weights, extra context); the teacher is not.
    """
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * scale
    priv_student = student + torch.randn(B, T, V, generator=g) * scale * 0.8
    priv_teacher = torch.randn(B, T, V, generator=g) * scale
    tokens = torch.multinomial(torch.softmax(student.reshape(-1, V), -1), 1, generator=g).view(B, T)
    mask = torch.rand(B, T, generator=g) < keep_p
    mask[:, 0] = True
    for r in empty_rows:
        mask[r] = False
    return (student.to(dtype).requires_grad_(True), priv_student.to(dtype), priv_teacher.to(dtype), tokens, mask)


def close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def run_reference(student, priv_s, priv_t, tokens, mask, **kw):
    s64 = student.detach().double().requires_grad_(True)
    out = ref.dopd_reference(s64, priv_s, priv_t, tokens, mask, **kw)
    out["loss"].backward()
    out["grad"] = s64.grad
    return out


# -- 1. dopd_loss against the fp64 reference ----------------------------------------------------------------------
# (seed, B, T, V, kwargs, rows with no masked-in token)
CASES = [
    pytest.param(0, 3, 5, 7, {}, (), id="V<top_k"),
    pytest.param(1, 4, 6, 40, {"top_k": 8}, (2,), id="top_k<V,empty-row"),
    pytest.param(2, 2, 10, 300, {}, (), id="V>top_k=128"),
    pytest.param(3, 5, 4, 16, {"top_k": 16, "beta_light": 0.7, "beta_weak": 0.2, "trim_top": 0.2}, (0,),
                 id="K=V,custom-weights"),
    pytest.param(4, 1, 24, 9, {"top_k": 3, "trim_top": 0.0}, (), id="single-row,no-trim"),
    pytest.param(5, 6, 8, 33, {"top_k": 5, "trim_top": 0.1}, (1, 4), id="many-tokens"),
]


@pytest.mark.parametrize("seed,B,T,V,kw,empty", CASES)
def test_dopd_loss_matches_reference(seed, B, T, V, kw, empty):
    student, priv_s, priv_t, tokens, mask = make_batch(seed, B, T, V, empty_rows=empty)
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, **kw)
    expected = run_reference(student, priv_s, priv_t, tokens, mask, **kw)
    assert expected["margin"] > 1e-5  # no token sits on a boundary that fp32 rounding could flip

    assert out.regime.dtype == torch.long and out.regime.shape == (B, T)
    assert torch.equal(out.regime, expected["regime"])
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert out.token_loss.dtype == torch.float32 and out.token_loss.shape == (B, T)
    close(out.token_loss.detach(), expected["token_loss"].detach(), atol=1e-4)
    close(out.loss.detach(), expected["loss"].detach(), atol=1e-4)
    for key in ("a_bar", "qs_bar", "qt_bar"):
        assert math.isclose(out.stats[f"gap/{key}"], expected["thresholds"][key], rel_tol=1e-5, abs_tol=1e-6), key
    out.loss.backward()
    close(student.grad, expected["grad"], atol=1e-4)
    assert float(student.grad.abs().max()) > 1e-3  # the gradient comparison is not between two zeros


def test_reference_cases_cover_every_regime():
    seen = set()
    for p in CASES:
        seed, B, T, V, kw, empty = p.values
        student, priv_s, priv_t, tokens, mask = make_batch(seed, B, T, V, empty_rows=empty)
        seen |= set(dopd_loss(student, priv_s, priv_t, tokens, mask, **kw).regime.unique().tolist())
    assert seen == {-1, LH, LL, HT, HS}


def test_dopd_loss_bf16_inputs():
    student, priv_s, priv_t, tokens, mask = make_batch(1, 4, 6, 40, empty_rows=(2,), dtype=torch.bfloat16)
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=8)
    assert out.loss.dtype == torch.float32 and out.token_loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.token_loss).all()
    # bf16 values upcast exactly to fp32, so the fp64 reference on the same (rounded) values still applies
    expected = run_reference(student, priv_s, priv_t, tokens, mask, top_k=8)
    assert expected["margin"] > 1e-5
    assert torch.equal(out.regime, expected["regime"])
    close(out.loss.detach(), expected["loss"].detach(), atol=1e-4)
    out.loss.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()
    close(student.grad, expected["grad"], atol=2e-3)


def test_dopd_loss_fp64_inputs():
    student, priv_s, priv_t, tokens, mask = make_batch(5, 6, 8, 33, empty_rows=(1, 4), dtype=torch.float64)
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=5, trim_top=0.1)
    assert out.loss.dtype == torch.float32 and out.token_loss.dtype == torch.float32
    expected = run_reference(student, priv_s, priv_t, tokens, mask, top_k=5, trim_top=0.1)
    assert torch.equal(out.regime, expected["regime"])
    close(out.loss.detach(), expected["loss"].detach(), atol=1e-6)
    out.loss.backward()
    close(student.grad, expected["grad"], atol=1e-6)


# -- 4. gradient isolation -------------------------------------------------------------------------------------------
def assert_no_grad(t: torch.Tensor):
    assert t.grad is None or float(t.grad.abs().max()) == 0.0


@pytest.mark.parametrize("target", ("teacher", "teacher_priv", "student_priv"))
@pytest.mark.parametrize("div,scope", [("rkl", "topk"), ("js", "full"), ("fkl", "sampled"), ("rkl", "sampled"),
                                       ("fkl", "topk")])
def test_routed_loss_grad_only_into_student(target, div, scope):
    student, priv_s, priv_t, tokens, mask = make_batch(6, 3, 5, 12)
    others = {name: torch.randn(3, 5, 12).requires_grad_(True) for name in ("teacher", "teacher_priv", "student_priv")}
    spec = RouterSpec(name="one", rules={"all": Rule(target, div, scope, top_k=4)})
    out = routed_loss(spec, student, tokens, mask, **others)
    out.loss.backward()
    for t in others.values():
        assert_no_grad(t)
    assert float(student.grad.norm()) > 1e-3


def test_dopd_loss_grad_only_into_student():
    student, priv_s, priv_t, tokens, mask = make_batch(7, 4, 6, 20)
    priv_s.requires_grad_(True)
    priv_t.requires_grad_(True)
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=6)
    out.loss.backward()
    assert_no_grad(priv_s)
    assert_no_grad(priv_t)
    assert float(student.grad.norm()) > 1e-3


def test_shared_weights_privileged_student_leaks_no_gradient():
    """The privileged student is the same network on a different context: its pass must not add gradient."""
    g = torch.Generator().manual_seed(8)
    B, T, H, V = 3, 5, 6, 11
    W = torch.randn(H, V, generator=g).requires_grad_(True)
    h_plain, h_priv = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    priv_t = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)

    dopd_loss(h_plain @ W, h_priv @ W, priv_t, tokens, mask, top_k=4).loss.backward()
    shared = W.grad.clone()
    W.grad = None
    dopd_loss(h_plain @ W, (h_priv @ W).detach(), priv_t, tokens, mask, top_k=4).loss.backward()
    close(shared, W.grad, atol=0)
    assert float(shared.norm()) > 1e-3


# -- 5. each regime's loss has a gradient; a naive self-KL does not -------------------------------------------------
def regime_only(name: str, **kw) -> RouterSpec:
    spec = dopd_spec(**kw)
    return replace(spec, name=f"only-{name}", rules={r: (rule if r == name else None) for r, rule in spec.rules.items()})


def with_prob(row: torch.Tensor, token: int, q: float) -> torch.Tensor:
    """A copy of a logit row whose softmax puts probability q on `token`."""
    row = row.clone()
    others = torch.cat([row[:token], row[token + 1:]])
    row[token] = math.log(q / (1.0 - q)) + float(torch.logsumexp(others, 0))
    return row


# (q_S, q_T) per intended regime: low A and confident, low A and unsure, teacher far ahead, student far ahead
DESIGN = {LH: (0.8, 0.75), LL: (0.05, 0.045), HT: (0.05, 0.6), HS: (0.6, 0.05)}


def constructed_batch(seed=9, B=2, T=8, V=24):
    """Every regime present by construction: each position gets the (q_S, q_T) of the regime (b*T + t) % 4."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    priv_s = torch.randn(B, T, V, generator=g)
    priv_t = torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    intended = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            r = (b * T + t) % 4
            intended[b, t] = r
            y = int(tokens[b, t])
            priv_s[b, t] = with_prob(priv_s[b, t], y, DESIGN[r][0])
            priv_t[b, t] = with_prob(priv_t[b, t], y, DESIGN[r][1])
    return student.requires_grad_(True), priv_s, priv_t, tokens, torch.ones(B, T, dtype=torch.bool), intended


def test_every_regime_has_a_gradient():
    student, priv_s, priv_t, tokens, mask, intended = constructed_batch()
    full = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=6)
    assert torch.equal(full.regime, intended)  # the construction puts tokens in every regime
    full_grad = torch.autograd.grad(full.loss, student)[0]

    total_loss, total_grad = 0.0, torch.zeros_like(student)
    for i, name in enumerate(REGIMES):
        out = routed_loss(regime_only(name, top_k=6), student, tokens, mask, teacher_priv=priv_t, student_priv=priv_s)
        assert torch.equal(out.regime, full.regime)  # dropping rules does not move tokens
        grad = torch.autograd.grad(out.loss, student)[0]
        assert float(grad.norm()) > 1e-6, name
        outside = (full.regime != i)
        assert float(grad[outside].abs().max()) == 0.0, name  # the gradient stays on this regime's tokens
        assert float(out.token_loss.detach()[outside].abs().max()) == 0.0, name
        total_loss += float(out.loss.detach())
        total_grad += grad
    # Eq. 10 is a sum of indicator-weighted terms: the four parts add up to the whole
    assert math.isclose(total_loss, float(full.loss.detach()), rel_tol=1e-5, abs_tol=1e-6)
    close(total_grad, full_grad, atol=1e-6)


def test_negative_control_naive_self_kl_has_no_gradient():
    """KL(p || sg p) is identically zero with zero gradient: a 'self-regulariser' written that way does nothing.
    The per-regime check above is meaningful because LL/HS anchor to the *privileged* student, another
    distribution, whose stop-gradient KL does have a gradient."""
    student, priv_s, _, _, _ = make_batch(10, 3, 4, 16, dtype=torch.float64)
    log_p = torch.log_softmax(student, -1)
    naive = (log_p.exp() * (log_p - log_p.detach())).sum(-1).mean()
    assert float(naive.detach().abs()) < 1e-12
    assert float(torch.autograd.grad(naive, student, retain_graph=True)[0].norm()) < 1e-10
    log_q = torch.log_softmax(priv_s, -1)
    anchored = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert float(torch.autograd.grad(anchored, student)[0].norm()) > 1e-3
    # and the routed LL/HS rules (anchors to sg[privileged student]) do have a gradient in the same setting
    tokens = torch.zeros(3, 4, dtype=torch.long)
    mask = torch.ones(3, 4, dtype=torch.bool)
    spec = RouterSpec(name="anchor", rules={"all": Rule("student_priv", "rkl", "topk", top_k=4)})
    out = routed_loss(spec, student, tokens, mask, student_priv=priv_s)
    assert float(torch.autograd.grad(out.loss, student)[0].norm()) > 1e-3
    # while anchoring to itself through the same router gives nothing
    out = routed_loss(spec, student, tokens, mask, student_priv=student)
    assert float(torch.autograd.grad(out.loss, student)[0].norm()) < 1e-10


# -- 6. regimes: exhaustive, exclusive, masking, monotonicity, ties ----------------------------------------------------
def gap_stats(priv_s, priv_t, tokens):
    ls, lt = sampled_logprob(priv_s, tokens), sampled_logprob(priv_t, tokens)
    return (lt - ls).abs(), ls.exp(), lt.exp()


@pytest.mark.parametrize("seed", range(4))
def test_regimes_exhaustive_and_exclusive(seed):
    student, priv_s, priv_t, tokens, mask = make_batch(20 + seed, 5, 7, 15, empty_rows=(3,))
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=5)
    assert torch.equal(out.regime == -1, ~mask)  # -1 exactly where masked out
    a, q_s, q_t = gap_stats(priv_s, priv_t, tokens)
    a_bar, qs_bar, qt_bar = (out.stats[f"gap/{k}"] for k in ("a_bar", "qs_bar", "qt_bar"))
    conf = (q_s + q_t) >= torch.tensor(qs_bar, dtype=torch.float32) + torch.tensor(qt_bar, dtype=torch.float32)
    ind = torch.stack([(a < a_bar) & conf, (a < a_bar) & ~conf, (a >= a_bar) & (q_t >= q_s),
                       (a >= a_bar) & (q_t < q_s)])  # the paper's four indicators
    assert torch.equal(ind[:, mask].sum(0), torch.ones(int(mask.sum()), dtype=torch.long))  # exactly one each
    assert torch.equal(ind.long().argmax(0)[mask], out.regime[mask])
    assert (out.token_loss.detach()[~mask] == 0).all()


def test_gap_uses_privileged_student_not_the_trained_student():
    student, priv_s, priv_t, tokens, mask = make_batch(11, 4, 8, 20)
    base = dopd_loss(student, priv_s, priv_t, tokens, mask).regime
    other_student = torch.randn_like(student) * 3
    assert torch.equal(dopd_loss(other_student, priv_s, priv_t, tokens, mask).regime, base)
    assert not torch.equal(dopd_loss(student, student.detach(), priv_t, tokens, mask).regime, base)


def test_trimmed_mean_matches_reference():
    g = torch.Generator().manual_seed(12)
    for n in (1, 2, 19, 20, 21, 40, 77):
        values = torch.rand(n, generator=g, dtype=torch.float64) ** 3
        for trim in (0.0, 0.05, 0.1, 0.25, 0.5, 0.9):
            assert math.isclose(float(trimmed_mean(values, trim)), ref.trimmed_mean(values.tolist(), trim),
                                rel_tol=1e-12), (n, trim)
    # floor: 0.05 * 19 drops nothing, 0.05 * 20 drops the single largest
    v = torch.arange(1.0, 21.0, dtype=torch.float64)
    assert float(trimmed_mean(v[:19], 0.05)) == 10.0
    assert float(trimmed_mean(v, 0.05)) == 10.0


def test_threshold_monotonicity_in_trim():
    """Dropping more of the largest A lowers A_bar, so the low-A set (LH u LL) can only shrink, never gain."""
    student, priv_s, priv_t, tokens, mask = make_batch(13, 6, 10, 18)
    prev_bar, prev_low = math.inf, None
    changed = False
    for trim in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        out = dopd_loss(student, priv_s, priv_t, tokens, mask, trim_top=trim)
        a_bar = out.stats["gap/a_bar"]
        low = (out.regime == LH) | (out.regime == LL)
        assert a_bar <= prev_bar + 1e-12
        if prev_low is not None:
            assert not (low & ~prev_low).any(), trim  # monotone: nothing becomes low-A as the bar falls
            changed |= bool((prev_low & ~low).any())
        high = (out.regime == HT) | (out.regime == HS)
        assert torch.equal(low | high, mask)
        prev_bar, prev_low = a_bar, low
    assert changed  # the sweep actually moved tokens from the low-A to the high-A regimes


def test_ties_follow_the_paper():
    """A == A_bar goes to a high-A regime; in the high-A branch q_T == q_S goes to HT; a low-A token whose summed
    confidence equals the summed bars goes to LH (the >= signs of paper 2.6, ambiguity 8.14)."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    # A = [0, 1, 2] exactly, A_bar = 1 exactly (no trim): the middle token sits on the threshold.
    ls = torch.tensor([[-1.0, -1.0, -1.0]])
    for lt, high_regime in ((torch.tensor([[-1.0, -2.0, -3.0]]), HS), (torch.tensor([[-1.0, 0.0, 1.0]]), HT)):
        regime, thr = assign_regimes(Gap(lt, ls), mask, GapSpec(trim_top=0.0))
        assert thr["a_bar"] == 1.0
        assert regime[0, 1] == high_regime and regime[0, 2] == high_regime
        assert regime[0, 0] in (LH, LL)
    # q_T == q_S everywhere: A = 0 = A_bar, all tokens are high-A ties and go to HT
    lt = torch.tensor([[-0.5, -1.5, -2.5, -0.1]])
    regime, thr = assign_regimes(Gap(lt, lt.clone()), torch.ones(1, 4, dtype=torch.bool), GapSpec(trim_top=0.25))
    assert thr["a_bar"] == 0.0 and (regime == HT).all()
    # low A with q_S + q_T == qS_bar + qT_bar exactly (dyadic probabilities, exact in fp32) goes to LH (>=)
    q_s = torch.tensor([[0.25, 0.25, 0.4375, 0.0625]])
    q_t = torch.tensor([[0.25, 0.25, 0.0625, 0.4375]])
    assert torch.equal(q_s.log().exp(), q_s) and torch.equal(q_t.log().exp(), q_t)  # precondition: exact
    regime, thr = assign_regimes(Gap(q_t.log(), q_s.log()), torch.ones(1, 4, dtype=torch.bool), GapSpec(trim_top=0.0))
    assert thr["qs_bar"] + thr["qt_bar"] == 0.5 and thr["a_bar"] > 0.5
    assert regime.tolist() == [[LH, LH, HS, HT]]


def test_gap_from_logits_is_eq1_at_the_loss_temperature():
    """Gap.from_logits (shared by the loss, the Fig. 9 pages and the anatomy script) is log softmax(z / tau) at the
    sampled token for both privileged passes, against fp64; and it is what routed_loss routes by when tau != 1."""
    student, priv_s, priv_t, tokens, mask = make_batch(21, 3, 7, 11)
    for tau in (1.0, 0.5, 2.0):
        gap = Gap.from_logits(priv_t, priv_s, tokens, tau)
        for got, logits in ((gap.log_q_teacher, priv_t), (gap.log_q_student, priv_s)):
            want = torch.log_softmax(logits.double() / tau, -1).gather(-1, tokens[..., None]).squeeze(-1)
            close(got, want, atol=1e-6)
        spec = replace(dopd_spec(), temperature=tau)
        out = routed_loss(spec, student, tokens, mask, teacher_priv=priv_t, student_priv=priv_s)
        assert torch.equal(out.regime, assign_regimes(gap, mask, spec.gap)[0])
    # the temperature matters: at 2.0 the gaps are not those at 1.0
    assert (Gap.from_logits(priv_t, priv_s, tokens, 2.0).advantage - Gap.from_logits(priv_t, priv_s, tokens).advantage
            ).abs().max() > 1e-2


def test_identical_privileged_passes_route_everything_to_ht():
    student, priv_s, _, tokens, mask = make_batch(14, 3, 6, 12, empty_rows=(1,))
    out = dopd_loss(student, priv_s, priv_s.clone(), tokens, mask)
    assert torch.equal(out.regime[mask], torch.full((int(mask.sum()),), HT))
    expected = run_reference(student, priv_s, priv_s.clone(), tokens, mask)
    close(out.loss.detach(), expected["loss"].detach(), atol=1e-5)


# -- 7. fully masked rows and batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fully_masked_batch(dtype):
    student, priv_s, priv_t, tokens, _ = make_batch(15, 3, 4, 10, dtype=dtype)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = dopd_loss(student, priv_s, priv_t, tokens, mask)
    assert out.loss.dtype == torch.float32 and float(out.loss.detach()) == 0.0
    assert out.loss.requires_grad
    assert (out.token_loss == 0).all() and (out.regime == -1).all()
    out.loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and float(student.grad.abs().max()) == 0
    assert all(math.isfinite(v) for v in out.stats.values())


def test_fully_masked_batch_with_extreme_logits_is_finite():
    student, priv_s, priv_t, tokens, _ = make_batch(16, 2, 3, 8)
    with torch.no_grad():
        student[0, 0, 0] = float("-inf")  # e.g. a banned vocabulary entry
    out = dopd_loss(student, priv_s, priv_t, tokens, torch.zeros(2, 3, dtype=torch.bool))
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.isfinite(student.grad).all()


def test_fully_masked_rows_are_ignored():
    student, priv_s, priv_t, tokens, mask = make_batch(17, 5, 6, 14, empty_rows=(0, 3))
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=4)
    assert torch.isfinite(out.loss) and torch.isfinite(out.token_loss).all()
    assert (out.regime[[0, 3]] == -1).all() and (out.token_loss[[0, 3]] == 0).all()
    out.loss.backward()
    assert torch.isfinite(student.grad).all()
    assert float(student.grad[[0, 3]].abs().max()) == 0.0
    keep = [1, 2, 4]  # the loss is the mean over the sequences that have tokens: dropping empty rows changes nothing
    sub = dopd_loss(student[keep], priv_s[keep], priv_t[keep], tokens[keep], mask[keep], top_k=4)
    assert torch.equal(sub.regime, out.regime[keep])
    close(sub.loss.detach(), out.loss.detach(), atol=1e-6)


def test_masked_out_positions_may_hold_ignore_ids():
    """Labels-style -100 at masked-out positions must neither crash the gather nor change anything."""
    student, priv_s, priv_t, tokens, mask = make_batch(18, 3, 6, 12, empty_rows=(2,))
    out = dopd_loss(student, priv_s, priv_t, tokens, mask, top_k=4)
    out_ignored = dopd_loss(student, priv_s, priv_t, tokens.masked_fill(~mask, -100), mask, top_k=4)
    assert torch.equal(out.regime, out_ignored.regime)
    close(out_ignored.loss.detach(), out.loss.detach(), atol=0)


# -- 8. gradient accumulation ----------------------------------------------------------------------------------------------
NON_ROUTING = [
    RouterSpec(name="v", rules={"all": Rule("teacher", "rkl", "topk")}),
    RouterSpec(name="v-js", rules={"all": Rule("teacher", "js", "full", top_k=4)}),
    RouterSpec(name="v-sampled", rules={"all": Rule("teacher", "rkl", "sampled")}),
]


@pytest.mark.parametrize("scope", ("full", "topk", "sampled"))
@pytest.mark.parametrize("padded", (False, True))
def test_one_group_over_every_token_or_some(scope, padded):
    """A single rule's rows are a view of the logits when it covers every position and a gather otherwise; both
    give the per-sequence mean of the per-token divergence (Eq. 11) and its gradient, as an fp64 recomputation."""
    student, _, teacher, tokens, mask = make_batch(23, 3, 5, 11)
    mask = mask if padded else torch.ones_like(mask)
    assert bool(mask.all()) != padded
    spec = RouterSpec(name="one", rules={"all": Rule("teacher", "rkl", scope, top_k=4)})
    out = routed_loss(spec, student, tokens, mask, teacher=teacher)
    grad = torch.autograd.grad(out.loss, student)[0]
    s64 = student.detach().double().requires_grad_(True)
    per_token = torch.zeros(mask.shape, dtype=torch.float64).index_put(
        (mask,), divergence(s64[mask], teacher.double()[mask], tokens[mask], divergence="rkl", scope=scope, top_k=4))
    expected = (per_token.sum(-1) / mask.sum(-1)).mean()
    close(out.loss.detach(), expected.detach(), atol=1e-6, rtol=1e-6)
    close(grad, torch.autograd.grad(expected, s64)[0], atol=1e-6, rtol=1e-5)
    assert float(grad.abs().max()) > 1e-3


@pytest.mark.parametrize("spec", NON_ROUTING, ids=lambda s: s.name)
def test_gradient_accumulation_invariance_without_routing(spec):
    """Two equal micro-batches, losses averaged, give the full batch's gradient (every sequence has tokens, so
    both halves hold the same number of sequences and the mean of the two means is the overall mean)."""
    student, _, teacher, tokens, mask = make_batch(19, 6, 7, 13)
    assert bool(mask.any(-1).all())
    full = routed_loss(spec, student, tokens, mask, teacher=teacher).loss
    g_full = torch.autograd.grad(full, student)[0]
    parts = [routed_loss(spec, student[sl], tokens[sl], mask[sl], teacher=teacher[sl]).loss
             for sl in (slice(0, 3), slice(3, 6))]
    g_acc = torch.autograd.grad((parts[0] + parts[1]) / 2, student)[0]
    close((parts[0] + parts[1]).detach() / 2, full.detach(), atol=1e-7, rtol=1e-6)
    close(g_acc, g_full, atol=1e-8, rtol=1e-6)
    assert float(g_full.abs().max()) > 1e-3


def test_routing_thresholds_are_batch_statistics():
    """Why the invariance above is not asked of DOPD: A_bar, qS_bar and qT_bar are trimmed means over the
    masked-in tokens of whatever batch the loss sees, so a micro-batch computes its own thresholds and may route a
    token differently from the full batch. Gradient accumulation over micro-batches is therefore a (reasonable)
    approximation for routing losses unless the thresholds are computed on the whole batch first."""
    student, priv_s, priv_t, tokens, mask = make_batch(19, 6, 7, 13)
    full = dopd_loss(student, priv_s, priv_t, tokens, mask)
    halves = [dopd_loss(student[sl], priv_s[sl], priv_t[sl], tokens[sl], mask[sl]) for sl in (slice(0, 3), slice(3, 6))]
    bars = [h.stats["gap/a_bar"] for h in halves]
    assert all(abs(b - full.stats["gap/a_bar"]) > 1e-4 for b in bars)


# -- 10. router specs ------------------------------------------------------------------------------------------------------
def test_router_passes():
    vanilla = RouterSpec(name="vanilla", rules={"all": Rule("teacher", "rkl", "sampled")})
    assert vanilla.passes == {"teacher"} and not vanilla.routes and not vanilla.needs_gap
    assert dopd_spec().passes == {"teacher_priv", "student_priv"} and dopd_spec().routes
    pruned = replace(vanilla, prune=PruneSpec(fraction=0.2, by="high_gap"))
    assert pruned.passes == {"teacher", "teacher_priv", "student_priv"}
    assert replace(vanilla, prune=PruneSpec(fraction=0.2, by="random")).passes == {"teacher"}
    self_only = RouterSpec(name="self", rules={"all": Rule("student_priv", "rkl", "topk")})
    assert self_only.passes == {"student_priv"}


def test_dopd_spec_matches_the_paper():
    spec = dopd_spec()
    lh, ll, ht, hs = (spec.rules[r] for r in REGIMES)
    assert (lh.target, lh.divergence, lh.scope, lh.weight, lh.top_k) == ("teacher_priv", "rkl", "topk", 0.6, 128)
    assert (ll.target, ll.divergence, ll.scope, ll.weight, ll.top_k) == ("student_priv", "rkl", "topk", 0.3, 128)
    assert (ht.target, ht.divergence, ht.scope, ht.weight, ht.beta) == ("teacher_priv", "js", "full", 1.0, 0.5)
    assert (hs.target, hs.divergence, hs.scope, hs.weight, hs.top_k) == ("student_priv", "rkl", "topk", 0.6, 128)
    assert all(r.support == "student" and not r.tail for r in (lh, ll, hs))
    assert spec.gap.trim_top == 0.05 and spec.gap.trim == "all" and spec.gap.normalize == "none"
    assert spec.student_context == "plain" and spec.temperature == 1.0


@pytest.mark.parametrize("make,field", [
    (lambda: Rule(target="oracle"), "target"),
    (lambda: Rule(divergence="tv"), "divergence"),
    (lambda: Rule(scope="dense"), "scope"),
    (lambda: Rule(support="union"), "support"),
    (lambda: Rule(top_k=0), "top_k"),
    (lambda: Rule(beta=1.5), "beta"),
    (lambda: GapSpec(trim_top=1.0), "trim_top"),
    (lambda: GapSpec(trim_top=-0.1), "trim_top"),
    (lambda: GapSpec(trim="q"), "trim"),
    (lambda: GapSpec(normalize="minmax"), "normalize"),
    (lambda: PruneSpec(fraction=1.0), "fraction"),
    (lambda: PruneSpec(by="entropy"), "by"),
    (lambda: RouterSpec(name="x", rules={"LH": Rule()}), "rules"),
    (lambda: RouterSpec(name="x", rules={"all": Rule()}, student_context="both"), "student_context"),
    (lambda: RouterSpec(name="x", rules={"all": Rule()}, temperature=0.0), "temperature"),
])
def test_bad_values_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_routed_loss_checks_its_inputs():
    student, priv_s, priv_t, tokens, mask = make_batch(21, 2, 3, 8)
    with pytest.raises(ValueError, match="student_priv"):
        routed_loss(dopd_spec(), student, tokens, mask, teacher_priv=priv_t)
    with pytest.raises(ValueError, match="teacher"):
        routed_loss(RouterSpec(name="v", rules={"all": Rule("teacher")}), student, tokens, mask)
    with pytest.raises(ValueError, match="aligned"):
        routed_loss(dopd_spec(), student, tokens, mask, teacher_priv=priv_t[:, :2], student_priv=priv_s)


def test_negative_weight_and_bad_chunk_size_are_rejected():
    with pytest.raises(ValueError, match="weight"):
        Rule("teacher", "rkl", "topk", weight=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        RouterSpec(name="x", rules={"all": Rule("teacher")}, chunk_size=0)


# -- threshold variants (paper 8.1): trim all statistics or the gap only; raw or z-scored confidences -----------------
GAP_VARIANTS = [(trim, normalize) for trim in ("all", "gap") for normalize in ("none", "zscore")]


def tied_gap(seed, B=6, T=9, *, dtype=torch.float64, pool=5, constant_teacher=False):
    """Log-probabilities drawn from a small pool, so values repeat within each statistic and many tokens have
    q_T == q_S exactly (A = 0); optionally one q_T for every token (a statistic with no spread). Partial mask."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(pool, generator=g, dtype=torch.float64).clamp_min(0.02).log()
    ls = values[torch.randint(pool, (B, T), generator=g)]
    lt = values[torch.randint(pool, (B, T), generator=g)]
    same = torch.rand(B, T, generator=g) < 0.25
    lt = torch.where(same, ls, lt)
    if constant_teacher:
        lt = torch.full_like(lt, float(values[0]))
    mask = torch.rand(B, T, generator=g) < 0.85
    mask[0, 0] = True
    return Gap(lt.to(dtype), ls.to(dtype)), mask


@pytest.mark.parametrize("trim,normalize", GAP_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed,trim_top,constant", [(0, 0.05, False), (1, 0.25, False), (2, 0.0, False),
                                                    (3, 0.1, True), (4, 0.05, True)])
def test_assign_regimes_matches_reference(seed, trim_top, constant, trim, normalize, dtype):
    gap, mask = tied_gap(seed, dtype=dtype, constant_teacher=constant)
    spec = GapSpec(trim_top=trim_top, trim=trim, normalize=normalize)
    regime, thr = assign_regimes(gap, mask, spec)
    expected = ref.regimes_reference(gap.log_q_teacher, gap.log_q_student, mask, trim_top=trim_top, trim=trim,
                                     normalize=normalize)
    assert torch.equal(regime == -1, ~mask)
    # precondition: the inputs do have ties, and few tokens sit so near a boundary that rounding may flip them
    assert (gap.log_q_teacher == gap.log_q_student)[mask].any()
    assert gap.log_q_student[mask].unique().numel() < int(mask.sum())
    decisive = expected["margin"] > (1e-9 if dtype == torch.float64 else 1e-4)
    assert decisive[mask].double().mean() >= 0.9
    assert torch.equal(regime[decisive], expected["regime"][decisive])
    for k, v in expected["thresholds"].items():
        assert math.isclose(thr[k], v, rel_tol=1e-12 if dtype == torch.float64 else 1e-5), k


def test_zscore_tie_goes_to_lh():
    """A low-A token whose z_S + z_T is exactly 0 is confident (the >= of the paper's rule, as in raw mode)."""
    q = torch.tensor([[0.5, 0.25, 0.625, 0.125]])  # q_T is q_S with pairs swapped
    q_s, q_t = q, q[:, [1, 0, 3, 2]]
    assert torch.equal(q.log().exp(), q)  # precondition: exact, so z_S + z_T = 0 exactly on the first two tokens
    regime, _ = assign_regimes(Gap(q_t.log(), q_s.log()), torch.ones(1, 4, dtype=torch.bool),
                               GapSpec(trim_top=0.0, normalize="zscore"))
    assert regime.tolist() == [[LH, LH, HS, HT]]


@pytest.mark.parametrize("seed", range(3))
def test_threshold_variants_change_only_the_lh_ll_split(seed):
    """Trimming q only or not, z-scoring or not: A_bar, the low/high-A split and HT vs HS stay the same (paper 8.1)."""
    student, priv_s, priv_t, tokens, mask = make_batch(40 + seed, 6, 12, 20)
    gap = Gap.from_logits(priv_t, priv_s, tokens)
    outs = [assign_regimes(gap, mask, GapSpec(trim=trim, normalize=norm)) for trim, norm in GAP_VARIANTS]
    base, base_thr = outs[0]
    lh_ll = []
    for regime, thr in outs[1:]:
        assert thr["a_bar"] == base_thr["a_bar"]
        high = regime >= HT
        assert torch.equal(high, base >= HT) and torch.equal(regime[high], base[high])
        lh_ll.append(not torch.equal(regime, base))
    assert any(lh_ll)  # precondition: some variant did move a token between LH and LL


@pytest.mark.parametrize("trim,normalize", GAP_VARIANTS)
def test_masked_out_values_do_not_move_thresholds(trim, normalize):
    """Padding may hold anything: only masked-in tokens enter A_bar, the q bars and the z-score statistics."""
    student, priv_s, priv_t, tokens, mask = make_batch(47, 6, 12, 20, keep_p=0.7)
    gap = Gap.from_logits(priv_t, priv_s, tokens)
    spec = GapSpec(trim_top=0.1, trim=trim, normalize=normalize)
    regime, thr = assign_regimes(gap, mask, spec)
    for pad_t, pad_s in ((0.0, 0.0), (0.0, -30.0), (-30.0, 0.0)):  # q = 1 or ~0 where masked out: far-off values
        other = Gap(gap.log_q_teacher.masked_fill(~mask, pad_t), gap.log_q_student.masked_fill(~mask, pad_s))
        assert torch.equal(assign_regimes(other, mask, spec)[0], regime) and assign_regimes(other, mask, spec)[1] == thr
