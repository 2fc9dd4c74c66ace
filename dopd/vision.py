"""Vision-language models: Qwen3-VL from a `transformers` config (the CPU testbed) or a checkpoint, and a processor.

The routers never see an image: a VLM changes only what goes *into* each forward pass (pixel values, image grid,
token types for multimodal RoPE), which `PrivilegedView.contexts` packs into `Contexts.model_inputs`. The
response is appended after the image tokens and the text exactly as for a text model, so the alignment guarantee
(logit n predicts response token n in every pass, whatever the prompt length) holds unchanged; Qwen3-VL computes
its 3-D positions from the attention mask, so left padding does not shift them either.

`ImageTextProcessor` does, for one image per prompt, what `Qwen3VLProcessor` does: resize and patch the image
(transformers' `Qwen2VLImageProcessorPil`), expand `<|image_pad|>` to one token per merged patch, tokenise, and
mark image tokens in `mm_token_type_ids`. It exists because `Qwen3VLProcessor` cannot be built without
torchvision (its video half), whose PyPI wheel fails to import beside this project's CPU torch. Real
checkpoints load their own processor with `AutoProcessor` (install torchvision on a GPU machine); both are called
the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from dopd.tokenizer import char_tokenizer

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
MARKER = "dopd_processor.json"  # a saved ImageTextProcessor (the shipped VLM zoo); anything else loads with AutoProcessor


def vision_tokenizer() -> PreTrainedTokenizerBase:
    """The in-code character tokenizer plus Qwen3-VL's four vision special tokens."""
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]})
    return tok


def _image_processor(patch_size: int = 16, merge_size: int = 2, min_pixels: int = 32 * 32, max_pixels: int = 128 * 128):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen3-VL's defaults except the pixel budget (its real one is ~1M pixels) and the normalisation, which is
    # Qwen3-VL's too (mean = std = 0.5).
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)


class ImageTextProcessor:
    """`processor(text=[...], images=[...])` -> input_ids, attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw: Qwen3VLProcessor's contract for prompts with one image each."""

    image_token, vision_start_token, vision_end_token = IMAGE_PAD, VISION_START, VISION_END

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, image_processor=None):
        self.tokenizer = tokenizer or vision_tokenizer()
        self.image_processor = image_processor or _image_processor()
        missing = [t for t in (IMAGE_PAD, VISION_START, VISION_END) if t not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks the vision tokens {missing}; build it with dopd.vision.vision_tokenizer()")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def __call__(self, text: list[str], images: list, return_tensors: str = "pt", padding: bool = True, **_):
        if len(text) != len(images):
            raise ValueError(f"{len(text)} prompts but {len(images)} images: every vision prompt has one image")
        pixels = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        counts = (pixels["image_grid_thw"].prod(-1) // merge).tolist()
        expanded = []
        for t, n in zip(text, counts):
            if t.count(IMAGE_PAD) != 1:
                raise ValueError(f"a vision prompt must contain {IMAGE_PAD} exactly once (the view's {{image}}); got {t!r}")
            expanded.append(t.replace(IMAGE_PAD, IMAGE_PAD * n))
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding, add_special_tokens=False)
        enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return {**enc, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        (folder / MARKER).write_text(json.dumps({"class": "dopd.vision.ImageTextProcessor"}) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ImageTextProcessor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return cls(AutoTokenizer.from_pretrained(folder), Qwen2VLImageProcessorPil.from_pretrained(folder))


def image_placeholder(processor) -> str:
    """The text that stands for one image in a prompt (the processor expands it to the image's tokens)."""
    return (getattr(processor, "vision_start_token", VISION_START) + processor.image_token
            + getattr(processor, "vision_end_token", VISION_END))


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens this tokenizer has (never sampled: a response cannot contain an image)."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, "<|vision_pad|>") if t in vocab]


def load_processor(path: str):
    """Our saved processor (the shipped VLM zoo) or a checkpoint's own, via AutoProcessor."""
    if path == "char":
        return ImageTextProcessor()
    if (Path(path) / MARKER).exists():
        return ImageTextProcessor.from_pretrained(path)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, AttributeError) as err:
        raise FileNotFoundError(
            f"could not load a processor from {path!r} ({type(err).__name__}: {err}). Real Qwen3-VL checkpoints need "
            "torchvision for their processor (pip install torchvision matching your torch), and a local path or a "
            "reachable hub id.") from err


def tiny_qwen3_vl(tokenizer: PreTrainedTokenizerBase, *, hidden_size: int = 64, num_hidden_layers: int = 2,
                  num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int | None = None,
                  vision_depth: int = 2, vision_hidden_size: int = 32, vision_heads: int = 2, patch_size: int = 16,
                  seed: int = 0, max_position_embeddings: int = 1024) -> PreTrainedModel:
    """A randomly initialised Qwen3VLForConditionalGeneration (the class of Qwen3-VL-2B/8B), seeded."""
    head_dim = hidden_size // num_attention_heads
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END))}
    # M-RoPE splits each head's rotary frequencies (head_dim / 2 of them) over time, height and width.
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         head_dim=head_dim, intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                          "mrope_interleaved": True},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                           num_heads=vision_heads, out_hidden_size=hidden_size, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                           num_position_embeddings=64),
        tie_word_embeddings=True, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(cfg)
    for c in (model.config, model.generation_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return model.float()
