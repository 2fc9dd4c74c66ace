"""What the built-in optimisations buy: each one already in dopd/, against the same work without it (before/after),
on one rollout of a pair."""

from __future__ import annotations

import copy

import torch

from .clocks import Clock, autocast, median
from .workloads import Workload


def bench_ablations(w: Workload, device, dtype, clock: str, reps: int) -> dict:
    """Each optimisation already in dopd/, against the same work without it, on one rollout of this pair."""
    from dopd import decode
    from dopd.rollout import sample
    from dopd.view import position_ids, response_logits

    s, key = w.spec, clock
    torch.manual_seed(1000)
    student = copy.deepcopy(w.student).train()
    roll = sample(student, w.view, w.batch(0), n=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature)
    tokens, mask, ctx = roll.tokens, roll.mask, roll.context
    priv = w.view.contexts(roll.examples, privileged=True, device=device)

    def timed(fn):  # the models are warm from the router steps; more than one rep adds a warm-up run
        vals = []
        for _ in range(reps + (reps > 1)):
            c = Clock(device)
            with c("x"):
                fn()
            vals.append(c.cpu["x"] if key == "cpu" else c.wall["x"])
        return median(vals[1:] if reps > 1 else vals) * 1e3

    def head_only():
        with autocast(device, dtype):
            logits = response_logits(student, ctx, tokens, mask)
        logits.float().logsumexp(-1).mean().backward()
        student.zero_grad(set_to_none=True)

    def full_logits():
        ids = torch.cat([ctx.input_ids, tokens], 1)
        attn = torch.cat([ctx.attention_mask, mask.long()], 1)
        with autocast(device, dtype):
            logits = student(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
        logits[:, ctx.input_ids.shape[1] - 1:-1].float().logsumexp(-1).mean().backward()
        student.zero_grad(set_to_none=True)

    def generate(cache: bool):
        def fn():
            torch.manual_seed(7)
            with torch.no_grad(), autocast(device, dtype):
                student.eval()
                student.generate(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, do_sample=True,
                                 max_new_tokens=s.max_new_tokens, min_new_tokens=s.max_new_tokens, temperature=1.0,
                                 top_k=0, top_p=1.0, pad_token_id=w.tokenizer.pad_token_id, use_cache=cache)
                student.train()
        return fn

    def lean_decode():  # the same work as generate(True): max_new_tokens sampled tokens per row, EOS suppressed
        torch.manual_seed(7)
        with autocast(device, dtype):
            decode.decode(student, ctx.input_ids, ctx.attention_mask, max_new_tokens=s.max_new_tokens,
                          eos_ids=[w.tokenizer.eos_token_id], pad_id=w.tokenizer.pad_token_id,
                          suppress=[w.tokenizer.eos_token_id])

    def teacher_pass(group):
        def fn():
            with torch.no_grad(), autocast(device, dtype):
                response_logits(w.teacher, ctx, tokens, mask, group)
        return fn

    def passes(which):
        def fn():
            with torch.no_grad(), autocast(device, dtype):
                if "teacher" in which:
                    response_logits(w.teacher, ctx, tokens, mask)
                if "teacher_priv" in which:
                    response_logits(w.teacher, priv, tokens, mask)
                if "student_priv" in which:
                    response_logits(student, priv, tokens, mask)
        return fn

    out = {
        "lm_head_on_response_only": {"before_ms": timed(full_logits), "after_ms": timed(head_only),
                                     "what": "student forward+backward: logits for every position vs logits_to_keep"},
        "kv_cache_in_rollout": {"before_ms": timed(generate(False)), "after_ms": timed(generate(True)),
                                "what": f"generate {s.max_new_tokens} tokens x {tokens.shape[0]} rows, no KV cache vs cache"},
        "lean_decoder": {"before_ms": timed(generate(True)), "after_ms": timed(lean_decode),
                         "what": f"sample {s.max_new_tokens} tokens x {tokens.shape[0]} rows: HF generate vs "
                                 "dopd.decode (rollout.engine)"},
        "shared_context_teacher": {"before_ms": timed(teacher_pass(1)), "after_ms": timed(teacher_pass(s.n)),
                                   "what": f"teacher pass: one context per row vs one per prompt for its {s.n} "
                                           "rollouts (response_logits group)"},
        "only_needed_passes_vanilla": {"before_ms": timed(passes({"teacher", "teacher_priv", "student_priv"})),
                                       "after_ms": timed(passes({"teacher"})),
                                       "what": "no-grad reference passes: all three vs vanilla's one (router.passes)"},
    }
    for v in out.values():
        v["speedup"] = v["before_ms"] / max(1e-9, v["after_ms"])
    return out
