"""An independent float64 reference for `dopd.divergences` and `dopd.routing`, written from the definitions.

Deliberately naive, so that it shares no code path (and no bug) with the implementation under test:
probabilities are built explicitly as exp(z - max z) / sum, the JS mixture is built in probability space, top-K sets
come from sorting Python floats, trimmed means from Python lists, and the DOPD loss is a Python loop over tokens.
No F.kl_div, no logsumexp, no log_softmax, no torch.topk, no checkpointing. Every function works on float64 torch
tensors with autograd, so gradients can be compared too (the top-K choice and the routing are made on plain floats,
i.e. without gradient, as the contract says).

Conventions (TRL >= 0.16, the paper's Eqs. 2-4 at beta = 0.5):
    fkl(S, T) = KL(T || S),  rkl(S, T) = KL(S || T),
    js_beta(S, T) = beta * KL(T || M) + (1 - beta) * KL(S || M),  M = (1 - beta) * S + beta * T,
    with TRL's endpoints: beta = 0 is KL(T || S) and beta = 1 is KL(S || T) (no mixture). Natural log.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

F64 = torch.float64
REGIMES = ("LH", "LL", "HT", "HS")


# -- distributions and divergences on one row ------------------------------------------------------------------
def probs(logits_row: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) of a 1-D row, in float64, via explicit exp and normalisation."""
    z = logits_row.to(F64) / temperature
    e = torch.exp(z - z.detach().max())  # the shift cancels in the ratio; it only avoids overflow
    return e / e.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) for strictly positive 1-D probability vectors."""
    return (p * (torch.log(p) - torch.log(q))).sum()


def div(p_s: torch.Tensor, p_t: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """One of fkl / rkl / js(beta) between the student's distribution p_s and the target's p_t."""
    if divergence == "fkl":
        return kl(p_t, p_s)
    if divergence == "rkl":
        return kl(p_s, p_t)
    if divergence != "js":
        raise ValueError(divergence)
    if beta == 0.0:
        return kl(p_t, p_s)
    if beta == 1.0:
        return kl(p_s, p_t)
    m = (1.0 - beta) * p_s + beta * p_t
    return beta * kl(p_t, m) + (1.0 - beta) * kl(p_s, m)


def top_indices(p: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries (ties broken by the lower index), by sorting Python floats."""
    vals = [float(x) for x in p.detach()]
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return order[: min(k, len(vals))]


def full_row(s_row, t_row, divergence, beta=0.5, temperature=1.0) -> torch.Tensor:
    return div(probs(s_row, temperature), probs(t_row.detach(), temperature), divergence, beta)


def topk_row(s_row, t_row, divergence, k, beta=0.5, support="student", tail=False, temperature=1.0) -> torch.Tensor:
    """Divergence restricted to the K largest entries of the student's (or target's) distribution.

    Without tail both restricted vectors are renormalised to sum to 1; with tail a (K+1)-th entry holds each side's
    remaining mass 1 - sum (omitted when the K entries are the whole vocabulary: it then has mass 0 on both sides).
    """
    p_s, p_t = probs(s_row, temperature), probs(t_row.detach(), temperature)
    idx = top_indices(p_s if support == "student" else p_t, k)
    sel = torch.tensor(idx, dtype=torch.long)
    a, b = p_s[sel], p_t[sel]
    if not tail:
        a, b = a / a.sum(), b / b.sum()
    elif len(idx) < p_s.numel():
        a = torch.cat([a, (1.0 - a.sum()).reshape(1)])
        b = torch.cat([b, (1.0 - b.sum()).reshape(1)])
    return div(a, b, divergence, beta)


def sampled_value(s_row, t_row, token: int, divergence, beta=0.5, temperature=1.0) -> float:
    """The one-sample estimate at y (y ~ student): its expectation under the student is the full divergence.

    rkl: log S(y)/T(y); fkl: (T/S) log(T/S) (importance-weighted); js: beta (T/S) log(T/M) + (1-beta) log(S/M).
    """
    s = float(probs(s_row, temperature)[token])
    t = float(probs(t_row, temperature)[token])
    if divergence == "rkl" or (divergence == "js" and beta == 1.0):
        return math.log(s / t)
    if divergence == "fkl" or (divergence == "js" and beta == 0.0):
        return (t / s) * math.log(t / s)
    m = (1.0 - beta) * s + beta * t
    return beta * (t / s) * math.log(t / m) + (1.0 - beta) * math.log(s / m)


def rows(fn, student: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Apply a per-row reference to [N, V] inputs (student cast to float64 keeping its graph) -> [N] float64."""
    s, t = student.to(F64), target.detach().to(F64)
    if s.shape[0] == 0:
        return s.new_zeros(0)
    return torch.stack([fn(s[i], t[i], *args, **kwargs) for i in range(s.shape[0])])


# -- DOPD --------------------------------------------------------------------------------------------------------
def trimmed_mean(values: list[float], trim_top: float) -> float:
    """Sort the n values, drop the floor(trim_top * n) largest, average the rest."""
    vals = sorted(values)
    n = len(vals)
    keep = vals[: n - math.floor(trim_top * n)]
    return math.fsum(keep) / len(keep)


def dopd_reference(student, priv_student, priv_teacher, tokens, mask, *, top_k=128, beta_light=0.6, beta_weak=0.3,
                   trim_top=0.05) -> dict:
    """The DOPD loss contract, token by token, in float64.

    Returns loss (0-d float64, graph into `student` when it requires grad), token_loss [B, T] float64, regime
    [B, T] long (0 LH, 1 LL, 2 HT, 3 HS, -1 masked out), the thresholds, and `margin`: the smallest distance of any
    masked-in token to a decision boundary it was tested against (a test precondition: fp32 rounding cannot flip it).
    """
    B, T, _ = student.shape
    s_all = student.to(F64)
    ps_all, pt_all = priv_student.detach().to(F64), priv_teacher.detach().to(F64)
    stats = {}
    for b in range(B):
        for t in range(T):
            if bool(mask[b, t]):
                y = int(tokens[b, t])
                q_s = float(probs(ps_all[b, t])[y])
                q_t = float(probs(pt_all[b, t])[y])
                stats[(b, t)] = (abs(math.log(q_t) - math.log(q_s)), q_s, q_t)
    regime = torch.full((B, T), -1, dtype=torch.long)
    token_loss = [[s_all.new_zeros(()) for _ in range(T)] for _ in range(B)]
    thresholds = {}
    margin = math.inf
    if stats:
        a_bar = trimmed_mean([v[0] for v in stats.values()], trim_top)
        qs_bar = trimmed_mean([v[1] for v in stats.values()], trim_top)
        qt_bar = trimmed_mean([v[2] for v in stats.values()], trim_top)
        thresholds = {"a_bar": a_bar, "qs_bar": qs_bar, "qt_bar": qt_bar}
        for (b, t), (a, q_s, q_t) in stats.items():
            margin = min(margin, abs(a - a_bar))
            if a < a_bar:
                margin = min(margin, abs((q_s + q_t) - (qs_bar + qt_bar)))
                r = 0 if q_s + q_t >= qs_bar + qt_bar else 1
            else:
                margin = min(margin, abs(q_t - q_s))
                r = 2 if q_t >= q_s else 3
            regime[b, t] = r
            s_row = s_all[b, t]
            if r == 0:
                value = beta_light * topk_row(s_row, pt_all[b, t], "rkl", top_k)
            elif r == 1:
                value = beta_weak * topk_row(s_row, ps_all[b, t], "rkl", top_k)
            elif r == 2:
                value = full_row(s_row, pt_all[b, t], "js", 0.5)
            else:
                value = beta_light * topk_row(s_row, ps_all[b, t], "rkl", top_k)
            token_loss[b][t] = value
    per_seq = []
    for b in range(B):
        n = int(mask[b].sum())
        if n > 0:
            per_seq.append(sum(token_loss[b][t] for t in range(T) if bool(mask[b, t])) / n)
    loss = torch.stack(per_seq).mean() if per_seq else s_all.sum() * 0.0
    return {"loss": loss, "token_loss": torch.stack([torch.stack(r) for r in token_loss]), "regime": regime,
            "thresholds": thresholds, "margin": margin}


def regimes_reference(log_q_teacher, log_q_student, mask, *, trim_top=0.05, trim="all", normalize="none") -> dict:
    """DOPD's regime per token under each threshold variant (paper 2.6 and ambiguity 8.1), on Python floats.

    A = |log q_T - log q_S| and A_bar its trimmed mean (sort, drop the floor(trim_top * n) largest, average the rest).
    `trim`: "all" trims q_S and q_T the same way, "gap" takes their plain means. `normalize`: "none" tests
    q_S + q_T >= qS_bar + qT_bar; "zscore" maps each of q_S, q_T to (q - m) / s, with m and s the mean and population
    standard deviation of that statistic's trimmed set (the same set its bar uses), and tests z_S + z_T >= 0. Both
    statistics keep the same number of values, so the ddof of s scales both z's alike and cannot change the sign.
    A statistic with s = 0 has z = 0 at its mean and +-inf away from it. Then A < A_bar: LH if confident else LL;
    A >= A_bar: HT if q_T >= q_S else HS.

    Returns regime [B, T] long (-1 masked out), the thresholds, and `margin` [B, T] float: each masked-in token's
    distance to the boundaries it was tested against (inf where masked out), so a test can skip tokens that rounding
    in the implementation may legitimately put on the other side.
    """
    B, T = mask.shape
    cells = [(b, t) for b in range(B) for t in range(T) if bool(mask[b, t])]
    lt = {c: float(log_q_teacher[c]) for c in cells}
    ls = {c: float(log_q_student[c]) for c in cells}
    a = {c: abs(lt[c] - ls[c]) for c in cells}
    q_t = {c: math.exp(lt[c]) for c in cells}
    q_s = {c: math.exp(ls[c]) for c in cells}
    trim_q = trim_top if trim == "all" else 0.0
    a_bar = trimmed_mean(list(a.values()), trim_top)
    qs_bar, qt_bar = trimmed_mean(list(q_s.values()), trim_q), trimmed_mean(list(q_t.values()), trim_q)

    def zscores(q: dict) -> dict:
        # exact rational mean and variance: equal values have exactly s = 0 and z = 0, not rounding noise over noise
        vals = sorted(Fraction(v) for v in q.values())
        kept = vals[: len(vals) - math.floor(trim_q * len(vals))]
        m = sum(kept) / len(kept)
        var = sum((v - m) ** 2 for v in kept) / len(kept)
        if var == 0:
            return {c: 0.0 if v == m else math.copysign(math.inf, v - m) for c, v in q.items()}
        return {c: float(Fraction(v) - m) / math.sqrt(var) for c, v in q.items()}

    if normalize == "zscore":
        z_s, z_t = zscores(q_s), zscores(q_t)
        conf = {c: z_s[c] + z_t[c] for c in cells}
    else:
        conf = {c: (q_s[c] + q_t[c]) - (qs_bar + qt_bar) for c in cells}
    regime = torch.full((B, T), -1, dtype=torch.long)
    margin = torch.full((B, T), math.inf, dtype=F64)
    for c in cells:
        if a[c] < a_bar:
            regime[c] = 0 if conf[c] >= 0 else 1
            margin[c] = min(a_bar - a[c], abs(conf[c]))
        else:
            regime[c] = 2 if q_t[c] >= q_s[c] else 3
            tie = lt[c] == ls[c]  # q_T == q_S exactly: both sides compute the same number, no rounding can flip it
            margin[c] = min(a[c] - a_bar, math.inf if tie else abs(q_t[c] - q_s[c]))
    return {"regime": regime, "margin": margin, "thresholds": {"a_bar": a_bar, "qs_bar": qs_bar, "qt_bar": qt_bar}}
