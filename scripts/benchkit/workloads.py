"""Fixed workloads: random-init Qwen3 teacher/student pairs, their prompts and the rollout settings every router of a
pair uses (the char tokenizer with the arithmetic task, or random token ids for the larger vocabularies)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dopd.tasks.base import Example
from dopd.view import Contexts


@dataclass(frozen=True)
class PairSpec:
    """A random-init teacher/student pair and the rollout settings every router of the pair uses."""

    name: str
    student: dict
    teacher: dict
    vocab: int | None = None  # None: the char tokenizer and the arithmetic task; else random prompt ids
    prompts: int = 8  # prompts per step (x n responses each)
    n: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    context: tuple[int, int] = (24, 32)  # id workloads: plain context length range
    hint: tuple[int, int] = (16, 24)  # id workloads: extra privileged tokens


def _arch(h, layers, heads, kv, **extra):
    return dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, **extra)


PAIRS = {
    # the default small pair: teacher 128x4, student 64x2 over the char tokenizer, the default rollout (8 x 4 x 48)
    "small": PairSpec("small", _arch(64, 2, 4, 2), _arch(128, 4, 4, 2)),
    # ~30M-parameter student (29.6M, 17.3M outside the embedding) and a ~2x teacher over a 32k vocabulary
    "30m": PairSpec("30m", _arch(384, 8, 6, 2), _arch(512, 12, 8, 2), vocab=32000, prompts=2),
    # for a GPU: Qwen3's vocabulary, ~0.4B student and ~1.4B teacher, longer rollouts (untested without a GPU)
    "gpu": PairSpec("gpu", _arch(1024, 16, 16, 8, max_position_embeddings=2048),
                    _arch(2048, 16, 16, 8, max_position_embeddings=2048), vocab=151936, prompts=16, n=4,
                    max_new_tokens=256, context=(96, 160), hint=(64, 96)),
    # for tests: the tiny_random config's sizes, a few tokens
    "tiny": PairSpec("tiny", _arch(32, 1, 2, 1), _arch(48, 2, 2, 1), prompts=2, n=2, max_new_tokens=8),
}


class IdTokenizer:
    """The few tokenizer attributes the rollout and the module read, for a tokenizer-free id workload."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    padding_side = "left"

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in range(len(ids))]


class IdView:
    """A duck-typed PrivilegedView over examples whose question and hint are space-separated token ids."""

    def __init__(self, vocab: int):
        self.tok = IdTokenizer(vocab)
        self.vocab_size = vocab  # what rollout.sample reads off a view: no padded rows ...
        self.never_sample: list[int] = []  # ... and no ids to suppress

    def contexts(self, examples, privileged: bool, device=None) -> Contexts:
        rows = [([int(i) for i in ex.hint.split()] if privileged else []) + [int(i) for i in ex.question.split()]
                for ex in examples]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            attn[i, width - len(r):] = 1
        return Contexts(ids.to(device), attn.to(device))


def id_examples(spec: PairSpec, count: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo_hi):
        n = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))
        return " ".join(str(int(i)) for i in torch.randint(4, spec.vocab, (n,), generator=g))

    return [Example(question=ids(spec.context), hint=ids(spec.hint), answer="-", solution="") for _ in range(count)]


@dataclass
class Workload:
    spec: PairSpec
    student: torch.nn.Module
    teacher: torch.nn.Module
    view: object
    tokenizer: object
    examples: list[Example]
    task: object

    def batch(self, step: int) -> list[Example]:
        k = self.spec.prompts
        start = (step * k) % max(1, len(self.examples) - k + 1)
        return self.examples[start:start + k]


def build_workload(spec: PairSpec, device, steps: int) -> Workload:
    from dopd.models import tiny_qwen3
    from dopd.tasks.arith import ArithTask

    task = ArithTask()
    if spec.vocab is None:
        from dopd.tokenizer import char_tokenizer
        from dopd.view import PrivilegedView

        tok = char_tokenizer()
        vocab, view = len(tok), PrivilegedView(tok)
        examples = task.examples("train", spec.prompts * (steps + 2), 0)
    else:
        vocab, view = spec.vocab, IdView(spec.vocab)
        tok = view.tok
        examples = id_examples(spec, spec.prompts * (steps + 2))
    student = tiny_qwen3(vocab, seed=0, **spec.student).to(device)
    teacher = tiny_qwen3(vocab, seed=1, **spec.teacher).to(device).eval().requires_grad_(False)
    return Workload(spec, student, teacher, view, tok, examples, task)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
