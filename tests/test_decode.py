"""The lean decoder (dopd/decode.py) against the HF model it reuses: same logits, same greedy text, the same
sampling distribution, and rollouts that fall back to `generate` where it does not apply."""

from __future__ import annotations

import pytest
import torch

from dopd import decode
from dopd.models import tiny_qwen3
from dopd.rollout import sample
from dopd.tasks.arith import ArithTask
from dopd.tokenizer import char_tokenizer
from dopd.view import PrivilegedView

TOK = char_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


def _model(seed=0, **kw):
    kw = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **kw}
    return tiny_qwen3(len(TOK), seed=seed, **kw).eval()


def _prompts(batch=6, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(TOK), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : row % 4] = 0  # left padding of 0-3 tokens
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4, "tie_word_embeddings": False}])
def test_step_logits_equal_the_hf_forward(monkeypatch, kw):
    """Every decoding step's logits equal the HF forward over prompt + response so far (padded rows included)."""
    model, (ids, mask) = _model(**kw), _prompts()
    seen = []
    choose = decode._choose
    monkeypatch.setattr(decode, "_choose", lambda logits, *a: (seen.append(logits.clone()), choose(logits, *a))[1])
    out = decode.decode(model, ids, mask, max_new_tokens=12, eos_ids=[EOS], pad_id=PAD, do_sample=False,
                        suppress=[EOS])  # no EOS: every row runs all 12 steps
    assert out.shape == (6, 12) and len(seen) == 12
    full_ids, full_mask = torch.cat([ids, out], 1), torch.cat([mask, torch.ones_like(out)], 1)
    with torch.no_grad():
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    for step, logits in enumerate(seen):
        torch.testing.assert_close(logits, ref[:, ids.shape[1] - 1 + step], atol=1e-5, rtol=1e-5)


def test_greedy_equals_generate_with_eos_and_suppressed_tokens():
    model, (ids, mask) = _model(seed=3), _prompts(batch=8, seed=1)
    # Make EOS likely enough that some rows stop early: the stop and the padding after it are part of the check.
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.6 * model.lm_head.weight.mean(0)
    suppress = [TOK.convert_tokens_to_ids("7"), TOK.bos_token_id]
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=PAD,
                         eos_token_id=[EOS], suppress_tokens=suppress, temperature=None, top_p=None,
                         top_k=None)[:, ids.shape[1]:]
    out = decode.decode(model, ids, mask, max_new_tokens=20, eos_ids=[EOS], pad_id=PAD, do_sample=False,
                        suppress=suppress)
    assert torch.equal(out, ref)
    assert not torch.isin(out, torch.tensor(suppress)).any()


def test_sampling_follows_the_softmax_and_the_warpers():
    """First-token frequencies over 4000 draws match the model's distribution (and its top-k / top-p cuts)."""
    model = _model(seed=5)
    ids, mask = _prompts(batch=1, seed=2)
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits[0, -1].softmax(-1)
    n = 4000
    rows, rows_mask = ids.expand(n, -1), mask.expand(n, -1)
    torch.manual_seed(0)
    first = decode.decode(model, rows, rows_mask, max_new_tokens=1, eos_ids=[EOS], pad_id=PAD)[:, 0]
    freq = torch.bincount(first, minlength=probs.numel()).float() / n
    assert 0.5 * (freq - probs).abs().sum() < 0.06  # total variation; ~0.03 expected from sampling noise alone

    top = probs.topk(3).indices
    first = decode.decode(model, rows, rows_mask, max_new_tokens=1, eos_ids=[EOS], pad_id=PAD, top_k=3)[:, 0]
    assert set(first.tolist()) <= set(top.tolist())
    first = decode.decode(model, rows, rows_mask, max_new_tokens=1, eos_ids=[EOS], pad_id=PAD, top_p=1e-6)[:, 0]
    assert set(first.tolist()) == {int(probs.argmax())}


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}])
def test_sampled_tokens_equal_generates_under_one_seed(kw):
    """Bit for bit, not only in distribution: the lean decoder draws the very tokens `generate` draws from the same
    seed, so switching engines (or optimising the decoder) never changes a run's rollouts."""
    model, (ids, mask) = _model(seed=4), _prompts(batch=8, seed=3)
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
    torch.manual_seed(123)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=24, pad_token_id=PAD,
                         eos_token_id=[EOS], suppress_tokens=[EOS], **kw)[:, ids.shape[1]:]
    torch.manual_seed(123)
    out = decode.decode(model, ids, mask, max_new_tokens=24, eos_ids=[EOS], pad_id=PAD, suppress=[EOS], **kw)
    assert torch.equal(out, ref)


def test_draws_equal_torch_multinomial():
    """`_draw` skips multinomial's input checks but must draw what it draws (same generator, same algorithm)."""
    probs = torch.softmax(3 * torch.randn(64, 88, generator=torch.Generator().manual_seed(0)), -1)
    probs[:, 5] = 0.0  # a suppressed token: never drawn
    torch.manual_seed(9)
    ref = torch.cat([torch.multinomial(probs, 1).squeeze(1) for _ in range(50)])
    torch.manual_seed(9)
    out = torch.cat([decode._draw(probs) for _ in range(50)])
    assert torch.equal(out, ref) and not (out == 5).any()


def test_supports_only_full_attention_qwen3():
    assert decode.supports(_model())
    assert not decode.supports(_model(use_sliding_window=True, sliding_window=4))
    assert not decode.supports(torch.nn.Linear(2, 2))


def test_rollouts_pick_the_engine_and_agree(monkeypatch):
    model, view = _model(seed=2), PrivilegedView(TOK)
    exs = ArithTask().examples("test", 4, 0)
    lean = sample(model, view, exs, do_sample=False, max_new_tokens=16, engine="lean")
    hf = sample(model, view, exs, do_sample=False, max_new_tokens=16, engine="hf")
    assert torch.equal(lean.tokens, hf.tokens) and torch.equal(lean.mask, hf.mask) and lean.texts == hf.texts
    calls = []
    monkeypatch.setattr(decode, "decode", lambda *a, **k: calls.append(1) or hf.tokens)
    sample(model, view, exs, do_sample=False, max_new_tokens=16)  # auto on CPU: the lean decoder
    sample(model, view, exs, do_sample=False, max_new_tokens=16, engine="hf")
    assert calls == [1]


def test_engine_errors_say_what_to_use():
    view, exs = PrivilegedView(TOK), ArithTask().examples("test", 2, 0)
    with pytest.raises(ValueError, match="auto, lean or hf"):
        sample(_model(), view, exs, engine="vllm")
    with pytest.raises(ValueError, match="rollout.engine=auto"):
        sample(_model(use_sliding_window=True, sliding_window=4), view, exs, engine="lean")
