"""The privileged view's alignment guarantee and the rollout's response mask."""

from __future__ import annotations

import torch

from dopd.models import tiny_qwen3
from dopd.rollout import response_mask, sample
from dopd.tasks.arith import ArithTask
from dopd.tokenizer import char_tokenizer
from dopd.view import Contexts, PrivilegedView, response_logits

TOK = char_tokenizer()


def _model(seed=0):
    return tiny_qwen3(len(TOK), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      seed=seed).eval()


def _logprobs(model, ctx, resp, mask):
    logits = response_logits(model, ctx, resp, mask)
    return torch.log_softmax(logits.float(), -1).gather(-1, resp[..., None]).squeeze(-1)


def test_response_logprobs_do_not_depend_on_padding():
    model, view = _model(), PrivilegedView(TOK)
    exs = ArithTask().examples("test", 3, 0)
    resp, mask = view.response_ids([e.solution for e in exs])
    ctx = view.contexts(exs, privileged=False)
    ref = _logprobs(model, ctx, resp, mask)
    for extra in (1, 7):  # the same prompts with more left padding
        pad = torch.full((len(exs), extra), TOK.pad_token_id)
        padded = Contexts(torch.cat([pad, ctx.input_ids], 1), torch.cat([torch.zeros_like(pad), ctx.attention_mask], 1))
        torch.testing.assert_close(_logprobs(model, padded, resp, mask)[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_each_row_equals_its_unbatched_forward():
    """Rows with prompts of different lengths (privileged and not) score exactly as when run alone."""
    model, view = _model(1), PrivilegedView(TOK)
    exs = ArithTask().examples("test", 4, 0)
    resp, mask = view.response_ids([e.solution for e in exs])
    for privileged in (False, True):
        batched = _logprobs(model, view.contexts(exs, privileged), resp, mask)
        for i, ex in enumerate(exs):
            n = int(mask[i].sum())
            alone = _logprobs(model, view.contexts([ex], privileged), resp[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_position_n_predicts_token_n():
    """A teacher-forced pass must reproduce the log-probs that generation used for the sampled tokens."""
    model, view = _model(2), PrivilegedView(TOK)
    exs = ArithTask().examples("test", 3, 0)
    ctx = view.contexts(exs, privileged=True)
    torch.manual_seed(0)
    out = model.generate(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, do_sample=True, max_new_tokens=6,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=TOK.pad_token_id,
                         eos_token_id=None, top_k=0, top_p=1.0, temperature=1.0)
    resp = out.sequences[:, ctx.input_ids.shape[1]:]
    gen = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(-1, resp[..., None]).squeeze(-1)
    forced = _logprobs(model, ctx, resp, torch.ones_like(resp, dtype=torch.bool))
    torch.testing.assert_close(forced, gen, atol=1e-4, rtol=1e-4)


def test_response_mask_keeps_first_eos_only():
    eos = 9
    toks = torch.tensor([[1, 2, eos, 3, eos], [1, 2, 3, 4, 5], [eos, 1, 1, 1, 1]])
    m = response_mask(toks, [eos])
    assert m.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    assert response_mask(toks, [eos, 3]).tolist()[1] == [True, True, True, False, False]  # a list of EOS ids


def test_sample_masks_after_eos_and_repeats_prompts():
    model, view = _model(3), PrivilegedView(TOK)
    exs = ArithTask().examples("train", 2, 0)
    roll = sample(model, view, exs, n=3, max_new_tokens=10)
    assert roll.tokens.shape[0] == 6 and [e.question for e in roll.examples[:3]] == [exs[0].question] * 3
    assert (roll.tokens[~roll.mask] == TOK.pad_token_id).all()
    assert (roll.lengths >= 1).all()


def test_greedy_sampling_is_deterministic():
    model, view = _model(4), PrivilegedView(TOK)
    exs = ArithTask().examples("test", 4, 0)
    a = sample(model, view, exs, do_sample=False, max_new_tokens=8)
    b = sample(model, view, exs, do_sample=False, max_new_tokens=8)
    assert torch.equal(a.tokens, b.tokens)


def test_shared_context_pass_equals_one_pass_per_row():
    """A prompt's n rollouts share one context pass (response_logits' group): same logits, same gradients."""
    model, view = _model(2).train(), PrivilegedView(TOK)
    roll = sample(model, view, ArithTask().examples("test", 4, 0), n=3, max_new_tokens=16)
    assert roll.n == 3
    for privileged in (False, True):
        ctx = view.contexts(roll.examples, privileged=privileged)
        per_row = response_logits(model, ctx, roll.tokens, roll.mask)
        shared = response_logits(model, ctx, roll.tokens, roll.mask, group=roll.n)
        torch.testing.assert_close(shared[roll.mask], per_row[roll.mask], atol=1e-5, rtol=1e-5)
        grads = [torch.autograd.grad(x[roll.mask].logsumexp(-1).sum(), list(model.parameters()))
                 for x in (per_row, shared)]
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
