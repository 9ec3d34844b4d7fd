"""Text rules for languages written without spaces (Chinese, Japanese): keys, joins, spacing.

Chinese text has no spaces between words, and the same text comes in full-width and
half-width forms (`ＡＢＣ１２３，` and `ABC123,`). Duplicate detection compares texts after
NFKC normalisation, which folds those forms together; spaces are kept only where they separate
words, never between two ideographs (`红色 五角星` is `红色五角星`); and pieces of a prompt are
joined with the full-width comma `，` when either side is Chinese, not with `, `.
"""

from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces: CJK ideographs (with extensions and compatibility forms), CJK
# punctuation, kana, and the full-width forms block.
_NO_SPACE = (
    "\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f"
)
_NO_SPACE_CHAR = re.compile(f"[{_NO_SPACE}]")
_SPACE_BETWEEN = re.compile(f"(?<=[{_NO_SPACE}])\\s+(?=[{_NO_SPACE}])")


def has_cjk(text: str) -> bool:
    """Whether `text` holds any character of a script written without spaces."""
    return _NO_SPACE_CHAR.search(text) is not None


def squash_spaces(text: str) -> str:
    """Runs of whitespace as one space, and none between two CJK characters."""
    return _SPACE_BETWEEN.sub("", " ".join(text.split()))


def dedupe_key(text: str, fold_case: bool = False) -> str:
    """The form two texts share when they are duplicates: NFKC (full- and half-width forms
    alike), spacing squashed as `squash_spaces`, and case folded if `fold_case`.

    Example:
        >>> dedupe_key("红色 五角星，ＡＢＣ") == dedupe_key("红色五角星,ABC")
        True
    """
    text = squash_spaces(unicodedata.normalize("NFKC", text))
    return text.casefold() if fold_case else text


def join_words(left: str, right: str) -> str:
    """Two words as one text: a space between them, unless both sides are CJK."""
    if not left or not right:
        return left or right
    return left + right if has_cjk(left[-1]) and has_cjk(right[0]) else f"{left} {right}"


def phrase_joiner(left: str, right: str) -> str:
    """What goes between two phrases of a prompt: `，` where either is Chinese, else `, `."""
    return "，" if has_cjk(left) or has_cjk(right) else ", "


def join_phrases(parts: list[str]) -> str:
    """Phrases as one prompt, each pair joined by `phrase_joiner`."""
    out = ""
    for i, part in enumerate(parts):
        if i:
            out += phrase_joiner(parts[i - 1], part)
        out += part
    return out
