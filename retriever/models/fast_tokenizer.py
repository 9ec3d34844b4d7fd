"""open_clip's CLIP tokenizer, the same token ids, many times faster.

open_clip's `SimpleTokenizer` spends its time per text: `ftfy.fix_text`, a Unicode regular
expression, and a Python byte-pair encoding per word (cached per word, but reached through
string joins and lookups). `FastClipTokenizer` gives the same ids with less work per text:

- printable ASCII without `&` (nearly every caption) is what `ftfy.fix_text` and
  `html.unescape` leave as it is, so it only has its whitespace collapsed and is lowercased;
  any other text goes through open_clip's own cleaning function;
- words are split by open_clip's own pattern (Python's `regex`), or, for printable ASCII, by the
  same pattern written for ASCII (stdlib `re`, about 3x faster);
- each distinct word's ids are cached; words not seen before are encoded together, by a Rust BPE
  from Hugging Face `tokenizers` built from the vocabulary and merges open_clip ships (nothing is
  downloaded), or by open_clip's own `bpe` when `tokenizers` is not installed;
- the [texts, context_length] array is filled in one vectorised numpy step, truncated as
  open_clip truncates (the end token kept last);
- a text naming a special token (`<start_of_text>`) is tokenized by open_clip itself.

Other tokenizers (Hugging Face ones, SigLIP's, `canonicalize` cleaning, reduction masks, extra
special tokens) are left as they are: `fast_tokenizer` returns them unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

# Texts that ftfy.fix_text or html.unescape could change hold something outside printable ASCII
# (str.isascii() and str.isprintable(): U+0020-U+007E) or `&` (entities). Printable ASCII alone has
# no mojibake, ligatures, wide forms, curly quotes, line breaks, control characters or terminal
# escapes, and NFC leaves it as it is.
# open_clip's word pattern (special tokens aside: those texts go to open_clip itself) ...
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# ... and the same on lowercased printable ASCII, where \p{L} is a-z, \p{N} 0-9 and \s a space.
_ASCII_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+")
# Between plain texts joined for `_plain_ids`: \x00 is not printable (never inside such a text) and
# not whitespace (str.split keeps it as a chunk of its own).
_END_CHUNK = "\x00"
_END = " \x00 "
CACHE_WORDS = 1_000_000  # distinct words whose ids are kept (about 150 MB at most); then it starts over


def supports(tokenizer: Any) -> bool:
    """Whether `tokenizer` is open_clip's plain CLIP BPE tokenizer, which this module reproduces."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:
        return False
    return (
        type(tokenizer) is SimpleTokenizer
        and getattr(tokenizer, "clean_fn", None) is _clean_lower
        and getattr(tokenizer, "reduction_fn", None) is None
        and len(tokenizer.all_special_ids) == 2
        and tokenizer.encoder.get("<start_of_text>") == tokenizer.sot_token_id
        and tokenizer.encoder.get("<end_of_text>") == tokenizer.eot_token_id
    )


def fast_tokenizer(tokenizer: Any, rust: bool | None = None) -> Any:
    """`FastClipTokenizer(tokenizer)` where it gives the same ids, else `tokenizer` unchanged."""
    if isinstance(tokenizer, FastClipTokenizer) or not supports(tokenizer):
        return tokenizer
    return FastClipTokenizer(tokenizer, rust=rust)


class FastClipTokenizer:
    """A drop-in for open_clip's `SimpleTokenizer`: `tok(texts)` gives the same LongTensor.

    Attributes it does not define (`decode`, `encoder`, `vocab_size`, ...) are the wrapped
    tokenizer's, which stays available as `.slow`.

    Args:
        slow: open_clip's tokenizer (see `supports`).
        rust: encode new words with Hugging Face `tokenizers` (None: when it is installed).

    Example:
        >>> tok = FastClipTokenizer(open_clip.get_tokenizer("ViT-B-32"))
        >>> tok(["a photo of a cat"])[0, :7].tolist()
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """

    def __init__(self, slow: Any, rust: bool | None = None):
        self.slow = slow
        self.context_length = slow.context_length
        self.sot_token_id = slow.sot_token_id
        self.eot_token_id = slow.eot_token_id
        self._rust_wanted = rust
        self._cache: dict[str, tuple[int, ...]] = {_END_CHUNK: (-1,)}  # where a text ends (_plain_ids)
        self._bpe = _rust_bpe(slow) if rust is not False else None
        if rust and self._bpe is None:
            raise ImportError("Hugging Face tokenizers is not installed: pip install tokenizers")

    def __getattr__(self, name: str) -> Any:
        if name == "slow":  # while unpickling, before __setstate__
            raise AttributeError(name)
        return getattr(self.slow, name)

    def __getstate__(self) -> dict:  # DataLoader workers get a copy: rebuild rather than pickle Rust
        return {"slow": self.slow, "rust": self._rust_wanted}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["slow"], rust=state["rust"])

    @property
    def rust(self) -> bool:
        """Whether new words are encoded by Hugging Face `tokenizers` (else by open_clip's `bpe`)."""
        return self._bpe is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and untruncated (open_clip's `encode`)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without start/end tokens and untruncated."""
        return self._ids(texts)

    def ids_array(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """`self(texts)` as an int64 numpy array."""
        import numpy as np

        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        assert context_length, "Please set a valid context length"
        n = len(texts)
        result = np.zeros((n, context_length), dtype=np.int64)
        if n == 0:
            return result
        if context_length == 1:  # open_clip: [sot, eot] cut to 1, whose last token becomes eot
            result[:, 0] = self.eot_token_id
            return result
        plain = np.fromiter(
            (type(t) is str and t.isascii() and t.isprintable() and "&" not in t for t in texts), dtype=bool, count=n
        )
        if plain.all():
            self._fill(result, None, *self._plain_ids(texts))
            return result
        where = np.flatnonzero(plain)
        if len(where):
            self._fill(result, where, *self._plain_ids([texts[int(i)] for i in where]))
        where = np.flatnonzero(~plain)
        per_text = self._ids([texts[int(i)] for i in where])
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        flat = np.fromiter(chain.from_iterable(per_text), dtype=np.int64, count=int(lengths.sum()))
        self._fill(result, where, flat, lengths)
        return result

    def _fill(self, result: np.ndarray, rows: np.ndarray | None, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Write [sot, ids..., eot] rows, cut as open_clip cuts (the last kept token becomes eot)."""
        import numpy as np

        body = result.shape[1] - 2  # room between the start and end tokens
        n = len(lengths)
        rows = np.arange(n) if rows is None else rows
        row_of = np.repeat(rows, lengths)
        position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = position < body
        result[row_of[keep], position[keep] + 1] = flat[keep]
        result[rows, 0] = self.sot_token_id
        result[rows, np.minimum(lengths, body) + 1] = self.eot_token_id

    def _plain_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids, ids per text) of printable-ASCII texts without '&', in one pass over all of them.

        Their cleaning is whitespace and case only, and open_clip's words never span a space, so
        a space-separated chunk ("red,") always gives the same ids: the texts are joined (with a
        chunk that marks where each ends), lowercased and split at once, and each chunk's ids
        come from the cache.
        """
        import numpy as np

        joined = _END.join(texts).lower()
        if "_of_text>" in joined:  # may name a special token: text by text
            per_text = self._ids(texts)
            lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
            return np.fromiter(chain.from_iterable(per_text), dtype=np.int64, count=int(lengths.sum())), lengths
        chunks = joined.split()
        cache = self._cache
        try:
            ids = list(chain.from_iterable(map(cache.__getitem__, chunks)))
        except KeyError:
            new = set(chunks).difference(cache)
            if len(cache) + len(new) > CACHE_WORDS:
                cache.clear()
                new = set(chunks)
            cache[_END_CHUNK] = (-1,)
            new.discard(_END_CHUNK)
            words = {chunk: _ASCII_WORDS.findall(chunk) for chunk in new}
            self._learn(sorted(set(chain.from_iterable(words.values())).difference(cache)))
            for chunk, parts in words.items():
                cache[chunk] = tuple(chain.from_iterable(map(cache.__getitem__, parts)))
            ids = list(chain.from_iterable(map(cache.__getitem__, chunks)))
        flat = np.array(ids, dtype=np.int64)
        ends = np.flatnonzero(flat < 0)
        lengths = np.diff(np.concatenate(([-1], ends, [len(flat)]))) - 1
        return flat[flat >= 0], lengths

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """The same LongTensor as open_clip's `SimpleTokenizer.__call__`: [len(texts), context_length]."""
        import torch

        return torch.from_numpy(self.ids_array(texts, context_length))  # type: ignore[return-value]

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, untruncated, without start/end tokens."""
        clean = self.slow.clean_fn
        get = self._cache.__getitem__
        ascii_words = _ASCII_WORDS.findall
        out: list[list] = []
        pending: list[int] = []  # texts with words not in the cache yet (out holds their words)
        special: list[int] = []
        for text in texts:
            if type(text) is str and text.isascii() and text.isprintable() and "&" not in text:
                cleaned = " ".join(text.split()).lower()
                words = ascii_words(cleaned)
            else:
                cleaned = clean(text)  # open_clip's own: ftfy, html.unescape twice, whitespace, lower
                words = ascii_words(cleaned) if cleaned.isascii() and cleaned.isprintable() else _unicode_words(cleaned)
            if "_of_text>" in cleaned:  # may name a special token, which open_clip's pattern matches first
                special.append(len(out))
                out.append([])
                continue
            try:
                out.append(list(chain.from_iterable(map(get, words))))
            except KeyError:
                pending.append(len(out))
                out.append(words)
        if pending:
            new = set(chain.from_iterable(out[i] for i in pending)).difference(self._cache)
            if len(self._cache) + len(new) > CACHE_WORDS:
                self._cache.clear()  # start over: the texts done so far need it no more
                new = set(chain.from_iterable(out[i] for i in pending))
            self._learn(sorted(new))
            for i in pending:
                out[i] = list(chain.from_iterable(map(get, out[i])))
        for i in special:
            out[i] = self.slow.encode(texts[i])
        return out

    def _learn(self, new: list[str]) -> None:
        """Put the ids of words not seen before into the cache."""
        if self._bpe is not None:
            encode = getattr(self._bpe, "encode_batch_fast", self._bpe.encode_batch)  # _fast: tokenizers >= 0.21
            encodings = encode(new, add_special_tokens=False)
            self._cache.update(zip(new, (tuple(e.ids) for e in encodings)))
            return
        slow = self.slow
        for word in new:
            symbols = slow.bpe("".join(slow.byte_encoder[b] for b in word.encode("utf-8")))
            self._cache[word] = tuple(slow.encoder[s] for s in symbols.split(" "))


def _rust_bpe(slow: Any) -> Any:
    """A Hugging Face BPE over open_clip's vocabulary and merges that encodes one word per input."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return None
    merges = sorted(slow.bpe_ranks, key=slow.bpe_ranks.__getitem__)
    vocab = {k: v for k, v in slow.encoder.items() if v not in slow.all_special_ids}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
    # Bytes to BPE symbols, the whole input as one word (words never hold whitespace).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tokenizer


def _unicode_words(cleaned: str) -> list[str]:
    """open_clip's words of a cleaned text, by open_clip's pattern and regex engine."""
    global _unicode_pattern
    if _unicode_pattern is None:
        import regex

        _unicode_pattern = regex.compile(_WORDS, regex.IGNORECASE)
    return _unicode_pattern.findall(cleaned)


_unicode_pattern: Any = None
