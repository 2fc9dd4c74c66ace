"""A character-level tokenizer made in code, so tests and the CPU testbed never touch a model hub.

It is a real `PreTrainedTokenizerFast`, so every code path (padding side, `decode`, `save_pretrained`,
`AutoTokenizer.from_pretrained`) is the one a Qwen3 tokenizer takes.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Everything the synthetic tasks write; unknown characters map to <unk> rather than failing.
DEFAULT_ALPHABET = "0123456789+-*/=;:#,.()[]<>|?!_ abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character, left padding (what generation and suffix alignment need)."""
    chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    return tok
