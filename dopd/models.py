"""Load a teacher/student pair: from a hub id or local path (real models, the shipped zoo) or random init.

Random init builds a Qwen3 decoder from a `transformers` config, the same class the paper's models use, so the
CPU testbed exercises exactly the code path of Qwen3-8B -> Qwen3-1.7B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config

from dopd.tokenizer import char_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Pair:
    student: PreTrainedModel
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def tiny_qwen3(vocab_size: int, *, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=None, max_position_embeddings=512, seed=0,
               tie_word_embeddings=True, **extra) -> PreTrainedModel:
    """A randomly initialised Qwen3ForCausalLM of the given size (seeded, so a config names one model)."""
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads, intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        attention_dropout=0.0, **extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def resolve_path(path: str, root: str | Path | None) -> str:
    """A relative path that exists under the project root is a local model; anything else is a hub id."""
    if root is not None and not Path(path).is_absolute() and (Path(root) / path).exists():
        return str(Path(root) / path)
    return path


def load_model(spec: dict, vocab_size: int | None = None, root: str | Path | None = None) -> PreTrainedModel:
    source = spec.get("source", "pretrained")
    dtype = _DTYPES[str(spec.get("dtype", "float32"))]
    if source == "random":
        arch = dict(spec.get("arch", {}))
        return tiny_qwen3(vocab_size=vocab_size, seed=spec.get("seed", 0), **arch).to(dtype)
    if source == "pretrained":
        path = resolve_path(spec["path"], root)
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **spec.get("kwargs", {}))
        except OSError as err:
            raise FileNotFoundError(
                f"model path {path!r} is neither a local directory nor a reachable hub id ({err.__class__.__name__}). "
                "Point model.student.path / model.teacher.path at a local checkout, or rebuild the shipped zoo "
                "with `make zoo`."
            ) from err
    raise ValueError(f"model source {source!r} unknown; use 'pretrained' (hub id or path) or 'random'")


def load_tokenizer(spec: dict, root: str | Path | None = None) -> PreTrainedTokenizerBase:
    """`char` builds the in-code tokenizer; anything else is a hub id or local path."""
    if spec.get("tokenizer", "char") == "char":
        return char_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_path(spec["tokenizer"], root))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(student, teacher, tokenizer, name: str) -> None:
    """Token-level distillation compares token ids: both models and the tokenizer must share one vocabulary."""
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(
            f"teacher and student vocabularies differ ({vt} vs {vs} rows in the output layer of model {name!r}): "
            "token-level distillation needs one vocabulary. Pick a pair from the same family "
            "(e.g. Qwen3-8B -> Qwen3-1.7B) or resize the embeddings of both to the same size."
        )
    if len(tokenizer) > vs:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {vs} output rows "
                         f"(model {name!r}): use the tokenizer the models were trained with (model.tokenizer)")


def load_pair(cfg: dict, root: str | Path | None = None) -> Pair:
    """Build the pair and check that both speak the tokenizer's vocabulary (distillation compares token ids)."""
    tokenizer = load_tokenizer(cfg, root)
    student = load_model(cfg["student"], vocab_size=len(tokenizer), root=root)
    teacher = load_model(cfg["teacher"], vocab_size=len(tokenizer), root=root)
    check_vocab(student, teacher, tokenizer, cfg.get("name", "pair"))
    return Pair(student, teacher, tokenizer, cfg.get("name", "pair"))
