"""A lean KV-cache decoder for Qwen3 text models: the HF model's own modules and weights, one preallocated cache,
and none of `generate`'s per-token machinery (mask building, cache objects, logits-processor lists).

Why: sampling is about half of an on-policy distillation step, and on small models a decode step is mostly
Python overhead around tiny matmuls. The same layers, called directly, give the same logits (checked against the
HF forward in `tests/test_decode.py`) in a fraction of the time. `rollout.engine=auto` uses this for the models
it supports (`supports`) and HF `generate` for everything else (vision-language models, sliding windows).

Sampling follows `generate`'s order: suppressed tokens, temperature, top-k, top-p, then a multinomial draw from the
global torch RNG; greedy decoding is the arg-max after suppression. Rows stop at their first EOS and are padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dopd.view import position_ids


def supports(model) -> bool:
    """True for a Qwen3 causal LM with full attention and no biases (the zoo, the tests and the paper's Qwen3s)."""
    cfg = getattr(model, "config", None)
    if cfg is None or type(model).__name__ != "Qwen3ForCausalLM" or getattr(cfg, "use_sliding_window", False):
        return False
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"]))


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, eos_ids: list[int],
           pad_id: int, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           suppress: list[int] | None = None) -> torch.Tensor:
    """Response ids [B, R] (R <= max_new_tokens) for left-padded prompts; `pad_id` after each row's first EOS."""
    core, (batch, prompt_len) = model.model, input_ids.shape
    device, dtype = input_ids.device, core.embed_tokens.weight.dtype
    first = core.layers[0].self_attn
    total = prompt_len + max_new_tokens
    cache = [(torch.zeros(batch, model.config.num_key_value_heads, total, first.head_dim, dtype=dtype, device=device),
              torch.zeros(batch, model.config.num_key_value_heads, total, first.head_dim, dtype=dtype, device=device))
             for _ in core.layers]
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    valid[:, :prompt_len] = attention_mask.bool()
    positions = position_ids(attention_mask)
    # Prompt: causal over real tokens; a pad query also sees itself, so no softmax row is empty (NaN-free cache).
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
    diag = torch.eye(prompt_len, dtype=torch.bool, device=device)
    fused = _fused(model)
    cos_table, sin_table = _rotary_tables(model, total, dtype, device)
    logits = _forward(model, cache, fused, input_ids, (cos_table[positions], sin_table[positions]),
                      _additive((causal & valid[:, None, None, :prompt_len]) | diag, dtype), start=0)
    next_pos = positions[:, -1:] + 1
    # The decode steps' mask: one additive row per sequence, opened one column per step (no per-step rebuild).
    mask = _additive(valid[:, None, None, :], dtype)

    eos = torch.tensor(eos_ids, device=device)
    blocked = torch.tensor(sorted(set(suppress or [])), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = _choose(logits, blocked, do_sample, temperature, top_k, top_p).masked_fill(finished, pad_id)
        out[:, step] = token
        finished |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or bool(finished.all()):
            return out[:, : step + 1]
        end = prompt_len + step + 1
        mask[..., end - 1] = 0.0
        logits = _forward(model, cache, fused, token[:, None], (cos_table[next_pos], sin_table[next_pos]),
                          mask[..., :end], start=end - 1)
        next_pos = next_pos + 1
    return out


def _fused(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, the q/k/v and gate/up weights side by side (two matmuls per layer where HF runs five), and the
    q_norm and k_norm weights per head ([H_q + H_kv, head_dim]): one norm and one rotation for q and k together.

    Rebuilt on every call (the student's weights change between steps); a copy of those weights, small next to
    the KV cache at the sizes this decoder is the default for (CPU)."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        heads_q, heads_kv = attn.q_proj.weight.shape[0] // attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim
        out.append((torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    torch.cat([attn.q_norm.weight.expand(heads_q, -1), attn.k_norm.weight.expand(heads_kv, -1)])))
    return out


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm without its weight, bit for bit: one native op for fp32, HF's fp32 round trip otherwise."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotary_tables(model, total: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for positions 0..total-1 ([total, head_dim]), from the model's own rotary module.

    Looked up by position at every step instead of recomputed. The sin table carries rotate_half's sign
    (-sin on the first half), so a rotation is x * cos + roll(x, head_dim / 2) * sin: the same products as HF's
    `apply_rotary_pos_emb`, in two ops fewer per tensor, and q and k rotate as one tensor."""
    probe = torch.zeros(1, dtype=dtype, device=device)
    cos, sin = model.model.rotary_emb(probe, torch.arange(total, device=device)[None])
    half = sin.shape[-1] // 2
    return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)


def _forward(model, cache, fused, ids, rotary, mask, *, start: int) -> torch.Tensor:
    """Logits of the last position [B, V]; writes the new keys and values at cache[start:start + T].

    `rotary` is (cos, signed sin) at the new positions ([B, T, head_dim]); `mask` is additive
    ([B, 1, T, start + T], 0 or -inf) and shared by every layer."""
    core = model.model
    h = core.embed_tokens(ids)
    batch, length = ids.shape
    cos, sin = (t.unsqueeze(1) for t in rotary)
    end = start + length
    eps = core.norm.variance_epsilon  # every Qwen3 norm uses config.rms_norm_eps
    for layer, (k_cache, v_cache), (w_qkv, w_gate_up, w_qk_norm) in zip(core.layers, cache, fused):
        attn = layer.self_attn
        head_dim = attn.head_dim
        heads_q = attn.q_proj.weight.shape[0] // head_dim
        qkv = F.linear(_rms(h, eps) * layer.input_layernorm.weight, w_qkv).view(batch, length, -1, head_dim)
        qk, v = qkv.split([w_qk_norm.shape[0], qkv.shape[2] - w_qk_norm.shape[0]], dim=2)
        qk = (_rms(qk, eps) * w_qk_norm).transpose(1, 2)  # [B, H_q + H_kv, T, head_dim]
        qk = qk * cos + qk.roll(head_dim // 2, -1) * sin
        q, k = qk.split([heads_q, qk.shape[1] - heads_q], dim=1)
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
                                           scale=attn.scaling, enable_gqa=True)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
        mlp = layer.mlp
        gate, up = F.linear(_rms(h, eps) * layer.post_attention_layernorm.weight, w_gate_up).chunk(2, dim=-1)
        h = h + mlp.down_proj(mlp.act_fn(gate) * up)
    return model.lm_head(_rms(h[:, -1], eps) * core.norm.weight)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _choose(logits: torch.Tensor, blocked: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
            top_p: float) -> torch.Tensor:
    scores = logits.float()
    if blocked.numel():
        scores[:, blocked] = float("-inf")
    if not do_sample:
        return scores.argmax(-1)
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:  # as transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1
        sorted_scores, order = scores.sort(dim=-1)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return _draw(scores.softmax(-1))


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row, the way `torch.multinomial(probs, 1)` makes it on CPU and CUDA: arg-max of p / q with
    q ~ Exp(1) (the exponential form of the Gumbel-max trick), from the same generator, so the same tokens.

    Without multinomial's input checks, which cost two host syncs per call: `probs` here is a softmax, never
    negative and never all zero. `tests/test_decode.py` checks that the draws equal torch.multinomial's."""
    noise = torch.empty_like(probs).exponential_(1)
    return torch.div(probs, noise, out=noise).argmax(-1)
