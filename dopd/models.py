"""Load a teacher/student pair: from a hub id or local path (real models, the shipped zoo) or random init.

Random init builds a Qwen3 decoder from a `transformers` config, the same class the paper's models use, so the
CPU testbed exercises exactly the code path of Qwen3-8B -> Qwen3-1.7B.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    processor: Any = None  # vision-language pairs: turns (text, image) into model inputs (dopd.vision)


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _looks_like_path(value: str, root: str | Path | None) -> bool:
    """`./x`, `/x`, `~/x`, or `a/b/...` whose first folder exists here or under the root; `Qwen/Qwen3-8B` is a hub id."""
    if "/" not in value:
        return False
    if value.startswith((".", "/", "~")):
        return True
    first = value.split("/", 1)[0]
    return Path(first).exists() or (root is not None and (Path(root) / first).exists())


def _check_local(key: str, value: str, root: str | Path | None, role: str | None = None) -> None:
    """Before anything loads: a path that names no folder, safetensors cut short, a model folder without tokenizer."""
    path = Path(resolve_path(value, root)).expanduser()
    if _looks_like_path(value, root) and not path.exists():
        raise FileNotFoundError(f"{key}={value}: no such folder ({path.absolute()}); fix the path (relative paths are "
                                "tried from the working directory, then the project root) or use a hub id"
                                + ("; the shipped zoo is rebuilt by `make zoo`" if value.startswith("zoo/") else ""))
    if not path.is_dir():
        return
    for f in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(f)
        if problem:
            raise ValueError(f"{key}={value}: {f} is {problem} (an interrupted download or copy?); download or copy "
                             f"the {role or 'model'} again")
    if role is None and not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}={value}: the folder has no tokenizer files (none of {', '.join(TOKENIZER_FILES)});"
                                " copy them from the model's original checkout, or point the setting at a folder "
                                "that has them")


def _safetensors_problem(f: Path) -> str | None:
    """Reads the header only: its length, its JSON, and whether the file is as long as the header says."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"truncated ({size} bytes, shorter than its header)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end <= size else f"truncated ({size} bytes of {8 + n + end})"


def load_model(spec: dict, vocab_size: int | None = None, root: str | Path | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None, vision: bool = False,
               role: str = "model") -> PreTrainedModel:
    """One model: `source: random` builds a tiny Qwen3 (Qwen3-VL when `vision`) from `arch`, `pretrained` loads."""
    source = spec.get("source", "pretrained")
    dtype = _DTYPES[str(spec.get("dtype", "float32"))]
    if source == "random":
        arch = dict(spec.get("arch", {}))
        if vision:
            from dopd.vision import tiny_qwen3_vl

            return tiny_qwen3_vl(tokenizer, seed=spec.get("seed", 0), **arch).to(dtype)
        return tiny_qwen3(vocab_size=vocab_size, seed=spec.get("seed", 0), **arch).to(dtype)
    if source == "pretrained":
        path = resolve_path(spec["path"], root)
        auto = AutoModelForCausalLM
        if vision:
            from transformers import AutoModelForImageTextToText as auto
        try:
            return auto.from_pretrained(path, dtype=dtype, **spec.get("kwargs", {}))
        except OSError as err:
            if Path(path).is_dir():
                raise OSError(f"model.{role}.path={spec['path']}: the folder {path} could not be loaded as the {role} "
                              f"({type(err).__name__}: {err})".replace("\n", " ")) from err
            raise FileNotFoundError(
                f"model path {path!r} is neither a local directory nor a reachable hub id ({err.__class__.__name__}). "
                "Point model.student.path / model.teacher.path at a local checkout, or rebuild the shipped zoo "
                "with `make zoo`."
            ) from err
        except Exception as err:  # e.g. safetensors' "incomplete metadata", which names neither file nor model
            raise RuntimeError(f"model.{role}.path={spec['path']}: loading the {role} from {path} failed "
                               f"({type(err).__name__}: {err}); the checkpoint may be damaged: download or copy it "
                               "again".replace("\n", " ")) from err
    raise ValueError(f"model source {source!r} unknown; use 'pretrained' (hub id or path) or 'random'")


def load_tokenizer(spec: dict, root: str | Path | None = None) -> PreTrainedTokenizerBase:
    """`char` builds the in-code tokenizer; anything else is a hub id or local path."""
    if spec.get("tokenizer", "char") == "char":
        return char_tokenizer()
    return _for_generation(AutoTokenizer.from_pretrained(resolve_path(spec["tokenizer"], root)))


def _for_generation(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (generation appends after the prompt) and a pad token (its EOS when it has none)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(student, teacher, tokenizer, name: str) -> int:
    """Token-level distillation compares token ids, so both models must cover the tokenizer's vocabulary.

    Output layers padded past the tokenizer are fine, even by different amounts (Qwen3 checkpoints pad to a
    multiple of 128): those rows are not tokens and are cut off (PrivilegedView.vocab_size). Returns len(tokenizer).
    """
    n = len(tokenizer)
    rows = {"student": student.get_output_embeddings().weight.shape[0],
            "teacher": teacher.get_output_embeddings().weight.shape[0]}
    short = {k: v for k, v in rows.items() if v < n}
    if short:
        which = " and ".join(f"the {k} only {v}" for k, v in short.items())
        raise ValueError(
            f"the tokenizer has {n} tokens but {which} output rows (model {name!r}; teacher {rows['teacher']}, "
            f"student {rows['student']} rows): teacher and student vocabularies differ from the tokenizer's. "
            "Use the tokenizer the models were trained with (model.tokenizer) and a teacher and student of one "
            "family (e.g. Qwen3-8B -> Qwen3-1.7B); padded extra rows are allowed, missing ones are not.")
    return n


def check_same_tokenizer(cfg: dict, tokenizer: PreTrainedTokenizerBase, root: str | Path | None = None) -> None:
    """A model directory that ships its own tokenizer must ship the same one as model.tokenizer.

    Equal row counts do not prove one vocabulary (two families can both pad to 152k rows), so the token -> id
    maps are compared. Models without tokenizer files (or hub ids that cannot be reached) are not checked here.
    """
    source = str(cfg.get("tokenizer", "char"))
    if source == "char":
        return
    vocab = tokenizer.get_vocab()
    for role in ("teacher", "student"):
        spec = cfg[role]
        if spec.get("source", "pretrained") != "pretrained" or str(spec.get("path")) == source:
            continue
        path = resolve_path(str(spec["path"]), root)
        if Path(path).is_dir() and not any((Path(path) / n).is_file() for n in TOKENIZER_FILES):
            log.debug("model.%s at %s ships no tokenizer files; not compared with model.tokenizer", role, path)
            continue  # a folder with only a config loads as a 1-token tokenizer, which is no tokenizer
        try:
            own = AutoTokenizer.from_pretrained(path)
        except Exception:  # no tokenizer files there, or an unreachable hub id: nothing to compare with
            log.debug("model.%s at %s ships no readable tokenizer; not compared with model.tokenizer", role, path)
            continue
        theirs = own.get_vocab()
        if theirs != vocab:
            first = min(i for _, i in set(theirs.items()) ^ set(vocab.items()))
            mine_tok, their_tok = (next((t for t, i in v.items() if i == first), None) for v in (vocab, theirs))
            raise ValueError(
                f"model.{role} ({path}, {len(theirs)} tokens) and model.tokenizer ({resolve_path(source, root)}, "
                f"{len(vocab)} tokens) are different tokenizers (id {first} is {their_tok!r} in the first, "
                f"{mine_tok!r} in the second): token-level distillation needs one vocabulary. Pick a teacher and a "
                "student of the same family (e.g. Qwen3-8B -> Qwen3-1.7B).")


def load_pair(cfg: dict, root: str | Path | None = None) -> Pair:
    """Build the pair and check that both speak the tokenizer's vocabulary (distillation compares token ids).

    `modality: vision` pairs (Qwen3-VL) load a `processor` (hub id, local path, or `char` for the in-code one)
    whose tokenizer is the pair's tokenizer.
    """
    modality = cfg.get("modality", "text")
    if modality not in ("text", "vision"):
        raise ValueError(f"model.modality={modality!r} is not one of ('text', 'vision')")
    vision, processor = modality == "vision", None
    for role in ("student", "teacher"):  # before the tokenizer and the (slow) models load
        if cfg[role].get("source", "pretrained") == "pretrained":
            _check_local(f"model.{role}.path", str(cfg[role]["path"]), root, role)
    key = "processor" if vision else "tokenizer"
    if str(cfg.get(key, "char")) != "char":
        _check_local(f"model.{key}", str(cfg[key]), root)
    if vision:
        from dopd.vision import load_processor

        source = str(cfg.get("processor", "char"))
        processor = load_processor(source if source == "char" else resolve_path(source, root))
        tokenizer = _for_generation(processor.tokenizer)
        cfg = {**cfg, "tokenizer": source}  # the processor's tokenizer is the one the checkpoints must share
    else:
        tokenizer = load_tokenizer(cfg, root)
    check_same_tokenizer(cfg, tokenizer, root)  # before the (slow) model loads
    student = load_model(cfg["student"], vocab_size=len(tokenizer), root=root, tokenizer=tokenizer, vision=vision,
                         role="student")
    if cfg["student"].get("gradient_checkpointing", False):
        # Recompute each decoder layer in the backward instead of storing its activations (long responses on GPUs).
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = load_model(cfg["teacher"], vocab_size=len(tokenizer), root=root, tokenizer=tokenizer, vision=vision,
                         role="teacher")
    check_vocab(student, teacher, tokenizer, cfg.get("name", "pair"))
    return Pair(student, teacher, tokenizer, cfg.get("name", "pair"), processor)
