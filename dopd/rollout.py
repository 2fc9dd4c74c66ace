"""On-policy rollouts: the current student samples responses from its own context (x alone by default).

Sampling runs without gradient, with a KV cache: through the lean decoder (`dopd/decode.py`) for the models it
supports, through HF `generate` otherwise. `engine`: auto (lean on CPU, generate on accelerators), lean, or hf.
The response mask keeps every token up to and including the first EOS (the terminating EOS is supervised, as in
TRL's GKD); everything after it is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dopd import decode
from dopd.tasks.base import Example
from dopd.view import Contexts, PrivilegedView


@dataclass
class Rollout:
    examples: list[Example]  # one per row (prompts repeated n times)
    context: Contexts  # the context the responses were sampled from
    tokens: torch.Tensor  # [B, R] response ids, pad after EOS
    mask: torch.Tensor  # [B, R] bool, True up to and including the first EOS
    texts: list[str]  # decoded responses without special tokens
    n: int = 1  # responses per prompt: rows come in runs of n sharing one context (response_logits' `group`)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def rows(self, start: int, stop: int, view: PrivilegedView, privileged: bool) -> "Rollout":
        """Rows [start, stop) as a rollout of their own: the context rebuilt for them alone (left-padded to their
        longest prompt), the responses cut to their longest one. Same logits at every response position (padding
        is masked out of attention and positions), so a step's loss can run over any cut into micro-batches."""
        if start % self.n or stop % self.n:
            raise ValueError(f"rows [{start}, {stop}) split a prompt's {self.n} rollouts")
        mask = self.mask[start:stop]
        width = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
        examples = self.examples[start:stop]
        ctx = view.contexts(examples, privileged=privileged, device=self.tokens.device)
        return Rollout(examples, ctx, self.tokens[start:stop, :width], mask[:, :width], self.texts[start:stop], self.n)


def cat_rollouts(rolls: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of several generation calls' rows, responses right-padded to the longest. Its `context` is the
    first call's, not the rows' own: cut it with `Rollout.rows` before any pass."""
    if len(rolls) == 1:
        return rolls[0]
    width = max(r.tokens.shape[1] for r in rolls)
    tokens = torch.cat([torch.nn.functional.pad(r.tokens, (0, width - r.tokens.shape[1]), value=pad_id) for r in rolls])
    mask = torch.cat([torch.nn.functional.pad(r.mask, (0, width - r.mask.shape[1]), value=False) for r in rolls])
    return Rollout([ex for r in rolls for ex in r.examples], rolls[0].context, tokens, mask,
                   [t for r in rolls for t in r.texts], rolls[0].n)


def response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row; the whole row when it has none."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos


@torch.no_grad()
def sample(model, view: PrivilegedView, examples: list[Example], *, n: int = 1, privileged: bool = False,
           max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           do_sample: bool = True, engine: str = "auto") -> Rollout:
    if max_new_tokens <= 0:
        raise ValueError(f"rollout.max_new_tokens must be > 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"rollout.temperature must be > 0 when sampling, got {temperature}; use greedy decoding instead")
    vocab = model.get_output_embeddings().weight.shape[0]
    if top_k > vocab:
        raise ValueError(f"rollout.top_k={top_k} exceeds the vocabulary ({vocab}); use 0 (off) or a value <= {vocab}")
    if engine not in ("auto", "lean", "hf"):
        raise ValueError(f"rollout.engine must be auto, lean or hf, got {engine!r}")
    device = next(model.parameters()).device
    # auto: lean where it was measured to pay (CPU); on accelerators HF generate stays the default until measured.
    lean = decode.supports(model) and (engine == "lean" or (engine == "auto" and device.type == "cpu"))
    if engine == "lean" and not lean:
        raise ValueError(f"rollout.engine=lean supports Qwen3 text models with full attention, not "
                         f"{type(model).__name__}; use rollout.engine=auto (falls back to HF generate)")
    rows = [ex for ex in examples for _ in range(n)]
    ctx = view.contexts(rows, privileged=privileged, device=device)
    tok = view.tok
    eos_ids = _eos_ids(model, tok)
    was_training = model.training
    model.eval()
    try:
        # Padded output rows are not tokens (see PrivilegedView), and a response may not contain image tokens.
        never = [*view.never_sample, *range(view.vocab_size, vocab)]
        if lean:
            tokens = decode.decode(model, ctx.input_ids, ctx.attention_mask, max_new_tokens=max_new_tokens,
                                   eos_ids=eos_ids, pad_id=tok.pad_token_id, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, suppress=never)
        else:
            gen_kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=eos_ids, use_cache=True)
            if do_sample:
                gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            if never:
                gen_kwargs["suppress_tokens"] = never
            out = model.generate(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, **ctx.model_inputs(),
                                 **gen_kwargs)
            tokens = out[:, ctx.input_ids.shape[1]:]
    finally:
        model.train(was_training)
    if tokens.shape[1] == 0:  # generation stopped at once for every row
        tokens = torch.full((len(rows), 1), eos_ids[0], dtype=torch.long, device=device)
    mask = response_mask(tokens, eos_ids)
    tokens = tokens.masked_fill(~mask, tok.pad_token_id)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    return Rollout(rows, ctx, tokens, mask, texts, n)


def _eos_ids(model, tok) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return ids
