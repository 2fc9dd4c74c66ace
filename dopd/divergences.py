"""Token-level divergences between the trained student and a target, at three scopes. Pure tensor functions.

All functions take rows of logits ``[N, V]`` (one row per supervised token) and return one value per row
``[N]`` in fp32 (fp64 inputs stay fp64, so an fp64 gradcheck is meaningful). Gradients flow only into
``student``: every target is detached here, so a self-distillation target (the privileged student, same weights)
can never leak gradient, whatever the caller does.

Conventions (TRL >= 0.16, stated once): the generalised Jensen-Shannon divergence with mixture weight beta is
``JS_b(S, T) = b*KL(T || M) + (1-b)*KL(S || M)`` with ``M = (1-b)*S + b*T``; the paper's JS (Eq. 4) is b=0.5.
``fkl`` = KL(T || S) (Eq. 2), ``rkl`` = KL(S || T) (Eq. 3). Natural log.

Scopes (Eq. 5): ``full`` (whole vocabulary, computed in row chunks so fp32 copies never exceed chunk x V),
``topk`` (K entries chosen on the student's or the target's distribution without gradient, both sides
renormalised on them, optionally with a tail bucket holding the remaining mass) and ``sampled`` (only the sampled
token: an unbiased one-sample estimate of the value whose gradient is the score-function gradient of the full
divergence, valid when the token was sampled from the student at temperature 1).
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("fkl", "rkl", "js")
SCOPES = ("sampled", "topk", "full")


def _check(divergence: str, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} unknown; choose one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"js beta must lie in [0, 1], got {beta}")


def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 for the math (bf16/fp16 -> fp32); never downcast fp64."""
    return x if x.dtype == torch.float64 else x.float()


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 (or fp64) logits / tau; at tau = 1 no [rows, V] copy is made of fp32 input."""
    x = _up(x)
    return x if temperature == 1.0 else x / temperature


def divergence_from_logprobs(log_s: torch.Tensor, log_t: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """Divergence between two normalised log-distributions over the last axis (any support), per row."""
    # -inf log-probs (masked vocabulary entries) become the most negative finite value: 0 * finite stays 0,
    # where 0 * (-inf - -inf) would be NaN in the value and the gradient.
    floor = torch.finfo(log_s.dtype).min
    log_s, log_t = log_s.clamp_min(floor), log_t.clamp_min(floor)
    p_s, p_t = log_s.exp(), log_t.exp()
    if divergence == "rkl":
        return (p_s * (log_s - log_t)).sum(-1)
    if divergence == "fkl":
        return (p_t * (log_t - log_s)).sum(-1)
    if beta == 0.0:  # TRL's endpoints: the mixture degenerates, the value is the plain KL (a different scale)
        return (p_t * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (p_s * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log1p(-beta), log_t + math.log(beta)]), dim=0)
    kl_tm = (p_t * (log_t - log_m)).sum(-1)
    kl_sm = (p_s * (log_s - log_m)).sum(-1)
    return beta * kl_tm + (1.0 - beta) * kl_sm


def _chunked(fn, student: torch.Tensor, target: torch.Tensor, *extra, chunk_size: int = 1024,
             checkpoint: bool = True) -> torch.Tensor:
    """Apply a row-wise fn(student_rows, target_rows, *extra_rows) chunk by chunk.

    With gradient, each chunk is checkpointed: its fp32 softmaxes are recomputed in backward instead of kept, so
    memory stays O(chunk x V) in fp32 whatever the number of rows. `extra` tensors are split alongside the rows.
    `checkpoint=False` is for functions whose backward keeps nothing of size V anyway (it saves the recompute).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    out = []
    pieces = zip(student.split(chunk_size), target.split(chunk_size), *(e.split(chunk_size) for e in extra))
    for s, t, *e in pieces:
        if checkpoint and s.requires_grad and s.shape[0] > 0:
            out.append(torch.utils.checkpoint.checkpoint(fn, s, t, *e, use_reentrant=False))
        else:
            out.append(fn(s, t, *e))
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return torch.cat(out) if out else student.new_zeros(0, dtype=dtype)


def full_divergence(student: torch.Tensor, target: torch.Tensor, divergence: str, beta: float = 0.5,
                    temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Whole-vocabulary divergence per row, chunked over rows (fp32 only inside a chunk).

    With gradient it runs as `_FullDivergence`: values chunk by chunk without a graph, then in backward one chunk's
    softmaxes at a time and the closed-form gradient written into one [N, V] tensor (no autograd graph of
    ~13 [chunk, V] intermediates, no checkpoint recompute of the forward graph).
    """
    _check(divergence, beta)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if student.requires_grad and torch.is_grad_enabled():
        return _FullDivergence.apply(student, target.detach(), divergence, beta, temperature, chunk_size)
    return _chunked(lambda s, t: full_divergence_unchunked(s, t, divergence, beta, temperature), student,
                    target.detach(), chunk_size=chunk_size, checkpoint=False)


class _FullDivergence(torch.autograd.Function):
    """D(softmax(s / tau), softmax(t / tau)) per row with the analytic gradient in s.

    With log S = z - logsumexp(z), z = s / tau, and h = dD/dlog S, dD/dz = h - S * sum(h). That gives
    rkl: S * (g - sum(S * g)) with g = log S - log T;  JS_b: the same with g = (1 - b) * log(S / M), M = (1-b)S + bT;
    fkl: S - T. Checked against autograd (fp64 gradcheck) in tests/test_divergences.py.

    Value and gradient come out of one pass over each chunk's softmaxes (in place where it can): the gradient is
    written into the one [N, V] tensor that backward returns anyway, so the softmaxes are never recomputed and the
    peak memory is that of the recomputing version.
    """

    @staticmethod
    def forward(ctx, student, target, divergence, beta, temperature, chunk_size):
        with torch.no_grad():
            if not ctx.needs_input_grad[0]:
                return torch.cat([full_divergence_unchunked(s, t, divergence, beta, temperature)
                                  for s, t in zip(student.split(chunk_size), target.split(chunk_size))])
            value, grad = _full_value_and_grad(student, target, divergence, beta, temperature, chunk_size)
        ctx.save_for_backward(student, target)  # only for a second backward (retain_graph), which recomputes
        ctx.args = (divergence, beta, temperature, chunk_size)
        ctx.grad = grad  # not a saved tensor: the first backward scales it in place
        return value

    @staticmethod
    def backward(ctx, grad_out):
        divergence, beta, temperature, chunk_size = ctx.args
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            student, target = ctx.saved_tensors
            grad = _full_value_and_grad(student, target, divergence, beta, temperature, chunk_size)[1]
        return grad.mul_((grad_out / temperature)[:, None].to(grad.dtype)), None, None, None, None, None


def _full_value_and_grad(student, target, divergence, beta, temperature, chunk_size):
    """Per row the divergence [N], and its gradient in z = s / tau [N, V] (the caller divides by tau once more)."""
    grad = torch.empty_like(student)
    scratch = student.new_empty((min(chunk_size, student.shape[0]), student.shape[-1]), dtype=_up(student[:0]).dtype)
    values = []
    for start in range(0, student.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        value, grad[rows] = _full_chunk_with_grad(student[rows], target[rows], divergence, beta, temperature, scratch)
        values.append(value)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return (torch.cat(values) if values else student.new_zeros(0, dtype=dtype)), grad


def _full_chunk_with_grad(s, t, divergence, beta, temperature, scratch):
    """Per row: the divergence and its gradient in z = s / tau (the caller divides by tau once more)."""
    floor = torch.finfo(_up(s).dtype).min
    log_s = torch.log_softmax(_scaled(s, temperature), dim=-1).clamp_min_(floor)
    log_t = torch.log_softmax(_scaled(t, temperature), dim=-1).clamp_min_(floor)
    p_s = log_s.exp()
    if divergence == "fkl" or (divergence == "js" and beta == 0.0):
        p_t = log_t.exp()
        value = _rowdot(p_t, log_t.sub_(log_s), scratch)  # KL(T || S)
        return value, p_s.sub_(p_t)
    if divergence == "rkl" or beta == 1.0:
        g = log_s.sub_(log_t)  # log S - log T
        value = _rowdot(p_s, g, scratch)  # KL(S || T)
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        kl_tm = _rowdot(log_t.exp(), log_t.sub_(log_m), scratch)
        g = log_s.sub_(log_m)  # log S - log M
        kl_sm = _rowdot(p_s, g, scratch)
        value = beta * kl_tm + (1.0 - beta) * kl_sm
        g.mul_(1.0 - beta)
        return value, g.sub_((1.0 - beta) * kl_sm[:, None]).mul_(p_s)
    return value, g.sub_(value[:, None]).mul_(p_s)


def _rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) per row with the product written into a reused buffer (torch.sum's cascade summation keeps
    fp32 accurate over a 150k vocabulary, where a BLAS dot product loses a digit)."""
    return torch.mul(a, b, out=scratch[: a.shape[0]]).sum(-1)


def full_divergence_unchunked(s, t, divergence, beta, temperature):
    """Whole-vocabulary divergence per row, all rows at once in one autograd graph (bench.py's naive baseline)."""
    log_s = torch.log_softmax(_scaled(s, temperature), dim=-1)
    log_t = torch.log_softmax(_scaled(t, temperature), dim=-1)
    return divergence_from_logprobs(log_s, log_t, divergence, beta)


def topk_divergence(student: torch.Tensor, target: torch.Tensor, divergence: str, k: int, beta: float = 0.5,
                    support: str = "student", tail: bool = False, temperature: float = 1.0,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Divergence restricted to K vocabulary entries per row.

    `support` picks whose top-K (no gradient through the choice). Without `tail`, both sides are renormalised on
    the K entries (the paper's best reading); with `tail`, a (K+1)-th bucket carries each side's remaining mass.
    """
    _check(divergence, beta)
    if support not in ("student", "target"):
        raise ValueError(f"top-K support {support!r} unknown; choose 'student' or 'target'")
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    if k >= student.shape[-1] and not tail:  # the top-K is the whole vocabulary: the full divergence, in one pass
        return full_divergence(student, target, divergence, beta, temperature, chunk_size)
    k = min(k, student.shape[-1])
    if not tail:
        # Renormalised on K entries, the divergence is the full divergence of the gathered [rows, K] logits (the
        # normaliser cancels): its analytic gradient, exactly 0 where the two rows are equal (a self-anchor whose
        # target is the student itself), and only [rows, K] entries kept for backward.
        s_k, t_k = gather_topk(student, target.detach(), k, support, chunk_size)
        return full_divergence(s_k, t_k, divergence, beta, temperature, chunk_size)
    return _chunked(lambda s, t: _topk_chunk(s, t, divergence, k, beta, support, tail, temperature), student,
                    target.detach(), chunk_size=chunk_size, checkpoint=True)


def gather_topk(student: torch.Tensor, target: torch.Tensor, k: int, support: str = "student",
                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' logits [N, K] at the K largest entries of `support`'s row (chosen without gradient, in row
    chunks: no fp32 [N, V] copy); the student's keep their gradient. The top-K of logits is that of softmax(z / tau)."""
    chooser = student if support == "student" else target
    idx = torch.cat([part.detach().topk(k, dim=-1).indices for part in chooser.split(chunk_size)]) \
        if chooser.shape[0] else chooser.new_zeros((0, k), dtype=torch.long)
    return student.gather(-1, idx), target.gather(-1, idx)


def _topk_chunk(s, t, divergence, k, beta, support, tail, temperature):
    """Top-K with a tail bucket: each side's K log-probabilities under the full normaliser, plus the rest's mass."""
    s, t = _scaled(s, temperature), _scaled(t, temperature)
    idx = (s if support == "student" else t).detach().topk(k, dim=-1).indices
    ks = _with_tail(s.gather(-1, idx) - torch.logsumexp(s, dim=-1, keepdim=True))
    kt = _with_tail(t.gather(-1, idx) - torch.logsumexp(t, dim=-1, keepdim=True))
    return divergence_from_logprobs(ks, kt, divergence, beta)


def _with_tail(log_k: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum exp(log_k)) as one bucket; clamped so a full-mass support stays finite."""
    mass = torch.logsumexp(log_k, dim=-1, keepdim=True)
    rest = torch.log((-torch.expm1(mass)).clamp_min(1e-12))
    return torch.cat([log_k, rest], dim=-1)


def sampled_divergence(student: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor, divergence: str,
                       beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """One-sample estimate at the sampled token y ~ student.

    Value: an unbiased estimate of the divergence (rkl: log S/T; fkl: (T/S) log T/S; js: the mixture terms,
    importance-weighted where the expectation is under T). Gradient: g(y) * grad log S(y) with g = dD/dS(y)
    detached, whose expectation is the exact gradient of the full divergence (the per-token "advantage" of
    on-policy distillation: for rkl, g = log S(y)/T(y), Thinking Machines' per-token reverse KL).
    """
    _check(divergence, beta)
    return _chunked(lambda s, t, y: _sampled_chunk(s, t, y, divergence, beta, temperature), student,
                    target.detach(), tokens, chunk_size=chunk_size)


def _sampled_chunk(student, target, tokens, divergence, beta, temperature):
    log_s, log_t = (_token_logprob(_up(x) / temperature, tokens) for x in (student, target))
    ls, lt = log_s.detach(), log_t
    if divergence == "rkl" or (divergence == "js" and beta == 1.0):
        value, g = ls - lt, ls - lt
    elif divergence == "fkl" or (divergence == "js" and beta == 0.0):
        w = (lt - ls).exp()
        value, g = w * (lt - ls), -w
    else:
        log_m = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        w = (lt - ls).exp()
        value = beta * w * (lt - log_m) + (1.0 - beta) * (ls - log_m)
        g = (1.0 - beta) * (ls - log_m)
    # value + g * (log S - sg log S): forward equals `value`, backward equals g * grad log S.
    return value + g * (log_s - ls)


def _token_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without materialising the [rows, V] log-softmax."""
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def divergence(student: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor, *, divergence: str, scope: str,
               beta: float = 0.5, top_k: int = 128, support: str = "student", tail: bool = False,
               temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Dispatch on scope; rows [N, V] -> [N] fp32."""
    if scope == "full":
        return full_divergence(student, target, divergence, beta, temperature, chunk_size)
    if scope == "topk":
        return topk_divergence(student, target, divergence, top_k, beta, support, tail, temperature, chunk_size)
    if scope == "sampled":
        return sampled_divergence(student, target, tokens, divergence, beta, temperature, chunk_size)
    raise ValueError(f"scope {scope!r} unknown; choose one of {SCOPES}")
