"""BERT's WordPiece tokenizer for Chinese-CLIP, with the Chinese BERT vocabulary bundled.

The same algorithm as Google BERT's `FullTokenizer`, which Chinese-CLIP ships (and as
`tokenizers`' BertWordPieceTokenizer): drop control characters, put spaces around every CJK
ideograph, lower-case and strip accents, split on punctuation, then greedy longest-match
WordPiece. Texts become `[CLS] ... [SEP]` padded with `[PAD]` (id 0) to the context length,
exactly as `cn_clip.clip.tokenize` does. Pure Python, so the bundled Chinese toy model needs no
extra package.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VOCAB_FILE = Path(__file__).parent / "vocab" / "bert-chinese.txt"
# Chinese-CLIP's reference code and all its released models use 52 tokens.
CONTEXT_LENGTH = 52
_MAX_CHARS_PER_WORD = 200
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_cjk(char: str) -> bool:
    """Whether `char` is a CJK ideograph (BERT's definition: the CJK Unified Ideographs blocks)."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf")


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # all non-letter ASCII counts, `$` and `^` included, as in BERT
    return unicodedata.category(char).startswith("P")


def basic_tokens(text: str, lower: bool = True) -> list[str]:
    """BERT's BasicTokenizer: words, CJK ideographs and punctuation marks as separate tokens."""
    chars = []
    for char in text:
        if char in ("\0", "\ufffd") or _is_control(char):
            continue
        if _is_whitespace(char):
            chars.append(" ")
        elif is_cjk(char):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    out = []
    for word in "".join(chars).split():
        if lower:
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for char in word:
            if _is_punctuation(char):
                if piece:
                    out.append(piece)
                out.append(char)
                piece = ""
            else:
                piece += char
        if piece:
            out.append(piece)
    return out


class WordPieceTokenizer:
    """Texts to `[CLS] ... [SEP]` id tensors, Chinese-CLIP style.

    Example:
        >>> WordPieceTokenizer()(["左边有一个大的红色五角星"]).shape
        torch.Size([1, 52])
    """

    def __init__(self, vocab_file: str | Path = VOCAB_FILE, context_length: int = CONTEXT_LENGTH):
        words = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if words and words[-1] == "":
            words.pop()
        self.vocab = {w.strip(): i for i, w in enumerate(words)}
        self.inv_vocab = {i: w for w, i in self.vocab.items()}
        self.context_length = context_length
        self.pad_token_id = self.vocab["[PAD]"]
        self.unk_token_id = self.vocab["[UNK]"]
        self.sot_token_id = self.cls_token_id = self.vocab["[CLS]"]
        self.eot_token_id = self.sep_token_id = self.vocab["[SEP]"]
        self._pieces = lru_cache(maxsize=1 << 16)(self._word_pieces)

    def _word_pieces(self, word: str) -> tuple[int, ...]:
        if len(word) > _MAX_CHARS_PER_WORD:
            return (self.unk_token_id,)
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return (self.unk_token_id,)
            start = end
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without `[CLS]`/`[SEP]`."""
        return [i for word in basic_tokens(text) for i in self._pieces(word)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text: WordPiece joins, no spaces between CJK ideographs, special tokens dropped."""
        words: list[str] = []
        for i in ids:
            token = self.inv_vocab.get(int(i), "[UNK]")
            if token in ("[CLS]", "[SEP]", "[PAD]"):
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        text = ""
        for word in words:
            if text and not (is_cjk(word[0]) or is_cjk(text[-1])):
                text += " "
            text += word
        return text

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """[n, context_length] long tensor: `[CLS]`, the ids cut to fit, `[SEP]`, then `[PAD]` (0)."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.full((len(texts), n), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.cls_token_id, *self.encode(text)[: n - 2], self.sep_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
