"""The privileged-input view: one example -> the unprivileged context (x) and the privileged context (x, p).

It also owns the alignment guarantee every router relies on: contexts are left-padded and the student-sampled
response is appended after them, so in *every* forward pass (student|x, student|x,p, teacher|x,p, teacher|x)
logit position n predicts response token n, whatever the context length or padding. Position ids are derived
from the attention mask, so left padding does not shift rotary positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from dopd.tasks.base import Example

EMPTY_HINT = ("plain", "template")  # what (x, p) is when p is empty: x itself, or the privileged template around ""


@dataclass
class Contexts:
    input_ids: torch.Tensor  # [B, L] left-padded
    attention_mask: torch.Tensor  # [B, L]
    vocab_size: int | None = None  # the tokenizer's vocabulary: logits beyond it (padded rows) are cut off
    # Vision prompts: pixel_values, image_grid_thw and mm_token_type_ids ([B, L], 1 at image tokens), which the
    # model needs for every pass over this context. Empty for text.
    vision: dict[str, torch.Tensor] = field(default_factory=dict)

    def equals(self, other: "Contexts") -> bool:
        """Token for token the same context (ids, mask and pixels): a pass over one is a pass over the other."""
        return (self.input_ids.shape == other.input_ids.shape and torch.equal(self.input_ids, other.input_ids)
                and torch.equal(self.attention_mask, other.attention_mask) and self.vision.keys() == other.vision.keys()
                and all(torch.equal(v, other.vision[k]) for k, v in self.vision.items()))

    def model_inputs(self, response: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Extra forward/generate inputs; token types are extended over an appended response (text tokens)."""
        out = dict(self.vision)
        if response is not None and "mm_token_type_ids" in out:
            out["mm_token_type_ids"] = torch.cat([out["mm_token_type_ids"], torch.zeros_like(response)], dim=1)
        return out


class PrivilegedView:
    """Formats x and (x, p) with string templates or a chat template, and scores aligned responses.

    `plain` and `privileged` are str.format templates over {question} and {hint}. With `chat=True` (real
    instruction-tuned models) the formatted text becomes the user turn of the tokenizer's chat template.

    With a `processor` (vision-language models, dopd.vision) each example's image is part of x: the templates
    must contain {image}, where the processor's image tokens go, and `contexts` carries the pixels.

    `empty_hint` says what (x, p) is when p is empty (a task's `hint_form=none`, the control): "plain" (the default)
    makes it the plain context token for token, so the control differs from its treatment only in p; "template"
    keeps the privileged template around an empty hint (e.g. "H:\nQ:..."), a different context from x: a
    hint-shaped but empty context, which moves the student by itself (experiments/RESULTS.md, the true control).

    `vocab_size` (default: len(tokenizer)) is the vocabulary every model's logits are cut to. Checkpoints often pad
    their output layer past the tokenizer (Qwen3: 151936 rows for 151669 tokens), by different amounts in a
    teacher and a student; ids past the tokenizer are not tokens, so cutting there makes any two such models
    comparable position by position, and `rollout.sample` never samples them.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, plain: str = "Q:{question}\n",
                 privileged: str = "H:{hint}\nQ:{question}\n", chat: bool = False, chat_kwargs: dict | None = None,
                 vocab_size: int | None = None, processor=None, empty_hint: str = "plain"):
        for name, tpl in (("plain", plain), ("privileged", privileged)):
            if "{question}" not in tpl:
                raise ValueError(f"view.{name} template {tpl!r} must contain {{question}}")
            if (processor is not None) != ("{image}" in tpl):
                raise ValueError(f"view.{name} template {tpl!r}: " + (
                    "a vision-language model needs {image} in both templates (where the image goes)" if processor
                    is not None else "{image} needs a vision-language model (model.modality: vision)"))
        if empty_hint not in EMPTY_HINT:
            raise ValueError(f"task.view.empty_hint={empty_hint!r} is not one of {EMPTY_HINT}")
        if "{hint}" not in privileged:
            raise ValueError(f"view.privileged template {privileged!r} must contain {{hint}}: it is where p goes")
        self.tok, self.plain, self.privileged, self.chat = tokenizer, plain, privileged, chat
        self.empty_hint = empty_hint
        self.processor = processor
        self.never_sample: list[int] = []  # ids a response may not contain (the model would read them as an image)
        if processor is not None:
            from dopd.vision import image_placeholder, vision_token_ids

            self.image = image_placeholder(processor)
            self.never_sample = vision_token_ids(tokenizer)
        self.chat_kwargs = dict(chat_kwargs or {})
        self.vocab_size = int(vocab_size or len(tokenizer))
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")

    # -- text ---------------------------------------------------------------------------------------------------
    def text(self, ex: Example, privileged: bool) -> str:
        fields = {"image": self.image} if self.processor is not None else {}
        privileged = privileged and (bool(ex.hint) or self.empty_hint == "template")
        body = (self.privileged if privileged else self.plain).format(question=ex.question, hint=ex.hint, **fields)
        if not self.chat:
            return body
        return self.tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                            add_generation_prompt=True, **self.chat_kwargs)

    def contexts(self, examples: list[Example], privileged: bool, device=None) -> Contexts:
        texts = [self.text(ex, privileged) for ex in examples]
        self.tok.padding_side = "left"
        if self.processor is None:
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
            return Contexts(enc["input_ids"].to(device), enc["attention_mask"].to(device), self.vocab_size)
        missing = [i for i, ex in enumerate(examples) if ex.image is None]
        if missing:
            raise ValueError(f"{len(missing)} example(s) have no image (first: {examples[missing[0]].question!r}); a "
                             "vision-language model needs a vision task (e.g. task=scenes)")
        enc = self.processor(text=texts, images=[_image(ex.image) for ex in examples], return_tensors="pt", padding=True)
        vision = {k: v.to(device) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        return Contexts(enc["input_ids"].to(device), enc["attention_mask"].to(device), self.vocab_size, vision)

    def response_ids(self, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise reference responses (SFT) right-padded, each followed by EOS; returns (ids, mask)."""
        eos = self.tok.eos_token_id
        rows = [self.tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)


def _image(image):
    """A PIL image as given, or opened from its file (JSONL rows name files), as RGB."""
    if isinstance(image, str):
        from PIL import Image

        with Image.open(image) as im:
            return im.convert("RGB")
    return image


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding never shifts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, ctx: Contexts, response: torch.Tensor, response_mask: torch.Tensor,
                    group: int = 1) -> torch.Tensor:
    """Logits [B, R, V] where [:, n] predicts response[:, n]; only response positions reach the lm_head.

    Context and response are concatenated; padding after EOS in the response is masked out of attention.
    V is the context's vocab_size when set (padded output rows cut off), else the model's row count.
    A vision context adds its pixels; the model then derives its 3-D positions from the attention mask itself.
    `group` > 1 says rows come in runs of `group` identical contexts (a prompt's rollouts, as `rollout.sample` lays
    them out): each context then runs once and its KV cache is shared by its run (text contexts).
    """
    if group > 1 and not ctx.vision and ctx.input_ids.shape[0] % group == 0:
        logits = _shared_context_logits(model, ctx, response, response_mask, group)
    else:
        ids = torch.cat([ctx.input_ids, response], dim=1)
        attn = torch.cat([ctx.attention_mask, response_mask.to(ctx.attention_mask.dtype)], dim=1)
        r = response.shape[1]
        extra = ctx.model_inputs(response) if ctx.vision else {"position_ids": position_ids(attn)}
        out = model(input_ids=ids, attention_mask=attn, logits_to_keep=r + 1, use_cache=False, **extra)
        logits = out.logits[:, :-1]
    return logits if ctx.vocab_size is None or ctx.vocab_size >= logits.shape[-1] else logits[..., : ctx.vocab_size]


def _shared_context_logits(model, ctx: Contexts, response: torch.Tensor, response_mask: torch.Tensor,
                           group: int) -> torch.Tensor:
    """response_logits with one context pass per run of `group` rows: (group - 1) / group of the context's compute
    saved; same values (the run's rows are identical, left-padded alike), gradients summed through the shared KV."""
    first_ids, first_mask = ctx.input_ids[::group], ctx.attention_mask[::group]
    head = model(input_ids=first_ids, attention_mask=first_mask, position_ids=position_ids(first_mask),
                 use_cache=True, logits_to_keep=1)
    first = head.logits.repeat_interleave(group, dim=0)  # [B, 1, V]: predicts response[:, 0]
    if response.shape[1] == 1:
        return first
    # transformers 5 names the cache `cache` (argument and output); 4.x `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(head, cache_kw)
    cache.batch_repeat_interleave(group)
    attn = torch.cat([ctx.attention_mask, response_mask.to(ctx.attention_mask.dtype)], dim=1)[:, :-1]
    tail = model(input_ids=response[:, :-1], attention_mask=attn, use_cache=True, **{cache_kw: cache},
                 position_ids=position_ids(attn)[:, ctx.input_ids.shape[1]:])
    return torch.cat([first, tail.logits], dim=1)
