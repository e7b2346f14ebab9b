"""Tokenizers built without the Hub: the exact CLIP BPE tokenizer and a small word-level T5 tokenizer.

Used by the test suite and the toy-world recipes to build real Diffusers pipelines offline. The CLIP
vocabulary is rebuilt from ``bpe_simple_vocab_16e6.txt.gz``, which ships inside open_clip, so token ids
match both open_clip's tokenizer and the released CLIP tokenizers.
"""

from __future__ import annotations

import functools
import gzip
import string
from importlib import resources


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode

    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The CLIP BPE tokenizer (49,408 tokens). SDXL's second tokenizer pads with ``"!"``.

    transformers 5 needs ``vocab=dict, merges=list``: passing file paths silently builds an empty vocab.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )


WORDS = (
    "a an the of on in at to with and or is are photo picture image video drawing of on left right top bottom "
    "up down moving red green blue yellow purple cyan white black orange pink gray circle square triangle "
    "shape object cat dog car tree house person man woman sky sun moon water city street"
).split()


def t5_tokenizer(model_max_length: int = 64, extra_words: tuple[str, ...] = ()):
    """A small Unigram T5 tokenizer (specials, words, letters and digits) for tiny T5/UMT5 encoders."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    seen = set(pieces)
    for word in (*WORDS, *extra_words):
        for piece in ("\u2581" + word, word):
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    pieces.append("\u2581")
    vocab = [(p, 0.0 if i < 3 else -float(len(p) < 3) - 1.0) for i, p in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
