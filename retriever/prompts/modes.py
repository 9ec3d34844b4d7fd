"""The four prompt-building algorithms of clip-interrogator 0.6.0, over label tables and one CLIP model.

Each mode returns the prompt as pieces, so the chosen terms are known without parsing the text.
`Interrogator` (interrogate.py) loads models and tables and calls these per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retriever.corpus.cjk import join_phrases, join_words
from retriever.models.encoder import Encoder
from retriever.models.loading import LoadedModel
from retriever.prompts.label_tables import LabelTable, Term, rank_tables

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MIN_FLAVORS = 8
FLAVOR_INTERMEDIATE_COUNT = 2048
# classic mode's single terms, in clip-interrogator's order; other tables follow in their order.
CLASSIC_SINGLES = ("mediums", "artists", "trendings", "movements")


@dataclass
class Piece:
    """One comma-separated part of a prompt and the terms it holds (the caption holds none)."""

    text: str
    terms: tuple[Term, ...] = ()


class PromptBuilder:
    """best, fast, classic and negative prompts for one image vector `xq` (normalised, 1-D)."""

    def __init__(
        self,
        model: LoadedModel,
        tables: list[LabelTable],
        flavor_intermediate_count: int = FLAVOR_INTERMEDIATE_COUNT,
        batch_size: int = 256,
    ):
        from retriever.models.prefix import PrefixScorer

        self.model = model
        self.encoder = Encoder(model)
        self.scorer = PrefixScorer(model, ", ", batch_size)
        self.tables = tables
        self.on_step: Callable[[int, int, float], None] | None = None
        self.flavor_intermediate_count = flavor_intermediate_count
        self.batch_size = batch_size

    def _positive_tables(self) -> list[LabelTable]:
        return [t for t in self.tables if t.name != "negative"]

    def fast(self, xq: np.ndarray, caption: str, max_flavors: int) -> list[Piece]:
        """interrogate_fast: the caption, then the top terms of all tables merged."""
        tops = rank_tables(self._positive_tables(), xq, max_flavors)
        return self.truncate(caption_piece(caption) + [Piece(t.text, (t,)) for t in tops])

    def classic(self, xq: np.ndarray, caption: str, max_flavors: int) -> list[Piece]:
        """interrogate_classic: caption, "medium artist", trending, movement (one each), then the
        top `max_flavors` flavors; other tables add their top term after movement."""
        by_name = {t.name: t for t in self._positive_tables()}
        singles = [n for n in CLASSIC_SINGLES if n in by_name] + [
            n for n in by_name if n not in CLASSIC_SINGLES and n != "flavors"
        ]
        ranked = {name: by_name[name].rank(xq, 1) for name in singles}
        top = {name: terms[0] for name, terms in ranked.items() if terms}
        medium, artist = top.get("mediums"), top.get("artists")
        pieces = caption_piece(caption)
        if caption and medium is not None and caption.startswith(medium.text):
            # As clip-interrogator: the caption already names the medium, so the artist follows it.
            head = Piece(join_words(caption, artist.text), (artist,)) if artist else pieces[0]
            pieces = [head]
        else:
            lead = tuple(t for t in (medium, artist) if t is not None)
            if lead:
                pieces.append(Piece(join_words(lead[0].text, lead[1].text) if len(lead) == 2 else lead[0].text, lead))
        pieces += [Piece(top[n].text, (top[n],)) for n in singles if n not in ("mediums", "artists") and n in top]
        if "flavors" in by_name:
            pieces += [Piece(t.text, (t,)) for t in by_name["flavors"].rank(xq, max_flavors)]
        return self.truncate(pieces)

    def best(self, xq: np.ndarray, caption: str, min_flavors: int, max_flavors: int) -> list[Piece]:
        """interrogate: chain from the caption over the top merged terms, then keep the most
        similar of caption, classic, fast and the chain."""
        flaves = rank_tables(self._positive_tables(), xq, self.flavor_intermediate_count)
        caption_sim = float((self.encode([caption]) @ xq)[0]) if caption else None
        chained = self.chain(xq, flaves, caption, caption_sim, min_flavors, max_flavors)
        candidates = [self.classic(xq, caption, max_flavors), self.fast(xq, caption, max_flavors), chained]
        if caption:
            candidates.insert(0, caption_piece(caption))
        candidates = [c for c in candidates if c]
        if not candidates:
            return []
        sims = self.encode([join(c) for c in candidates]) @ xq
        return candidates[int(sims.argmax())]

    def negative(self, xq: np.ndarray, max_flavors: int) -> list[Piece]:
        """interrogate_negative: chain the terms least like the image, from the flavors least like
        it and the whole negative list (every positive table when there is no flavors table)."""
        by_name = {t.name: t for t in self.tables}
        source = [by_name["flavors"]] if "flavors" in by_name else self._positive_tables()
        flaves = rank_tables(source, xq, self.flavor_intermediate_count, reverse=True)
        if "negative" in by_name:
            negative = by_name["negative"]
            scored = {t.text: t for t in negative.rank(xq, len(negative))}
            flaves += [scored[label] for label in negative.labels if label in scored]
        return self.chain(xq, flaves, "", None, DEFAULT_MIN_FLAVORS, max_flavors, reverse=True)

    def chain(
        self,
        xq: np.ndarray,
        phrases: list[Term],
        caption: str,
        caption_sim: float | None,
        min_count: int,
        max_count: int,
        reverse: bool = False,
    ) -> list[Piece]:
        """clip-interrogator's chain: add the phrase that makes the prompt most similar (least with
        `reverse`); stop when that no longer improves it, after at least `min_count` additions.
        Returns the best prompt seen.

        Unlike the original, a prompt that would not fit the context (so would be truncated) is
        never chosen: the next best phrase that fits is taken, and the chain stops when none
        does. With `reverse`, the starting similarity is negated too (the original compares
        negated sims against a plain one).
        """
        sign = -1.0 if reverse else 1.0
        on_step = self.on_step
        remaining = list({t.text: t for t in phrases}.values())
        if caption:
            curr: list[Term] = []
            best_sim = sign * float(caption_sim if caption_sim is not None else (self.encode([caption]) @ xq)[0])
        else:
            if not remaining:
                return []
            first = max(remaining, key=lambda t: sign * t.score)  # a lone label's cosine is its table score
            curr = [first]
            remaining.remove(first)
            best_sim = sign * first.score
        best, curr_sim = list(curr), best_sim
        for idx in range(max_count):
            if not remaining:
                break
            pieces = caption_piece(caption) + [Piece(t.text, (t,)) for t in curr]
            prefix, last = join(pieces), pieces[-1].text
            fitting = self._fitting(prefix, last, remaining)
            if not fitting:
                break
            sims = sign * self._scores(prefix, last, [remaining[i].text for i in fitting], xq)
            if on_step is not None:
                on_step(idx + 1, max_count, float(sign * sims.max()))
            best_at = int(sims.argmax())
            pick, sim = fitting[best_at], float(sims[best_at])
            if sim > best_sim:
                best, best_sim = curr + [remaining[pick]], sim
            if not (sim > curr_sim or idx < min_count):
                break
            curr, curr_sim = curr + [remaining[pick]], sim
            remaining.pop(pick)
        return caption_piece(caption) + [Piece(t.text, (t,)) for t in best]

    def _scores(self, prefix: str, last: str, texts: list[str], xq: np.ndarray) -> np.ndarray:
        """Similarity to `xq` of `prefix` extended by each text, joined as the prompt will be
        (`，` next to Chinese: `phrase_joiner` of the prefix's last piece and the text)."""
        import numpy as np

        from retriever.corpus.cjk import phrase_joiner

        joiners = [phrase_joiner(last, text) for text in texts]
        sims = np.empty(len(texts), dtype=np.float32)
        for joiner in set(joiners):
            at = [i for i, j in enumerate(joiners) if j == joiner]
            sims[at] = self.scorer.encode(prefix, [texts[i] for i in at], joiner) @ xq
        return sims

    def _fitting(self, prefix: str, last: str, terms: list[Term]) -> list[int]:
        """Positions of the terms whose `prefix, term` fits the context: counted from cached
        token counts where tokens concatenate exactly, tokenized in full otherwise."""
        from retriever.corpus.cjk import phrase_joiner
        from retriever.models.prefix import is_plain

        joiners = [phrase_joiner(last, t.text) for t in terms]
        if self.scorer.shareable(prefix):
            prefix_tokens = self.scorer.tokens(prefix)
            known = {
                i: self.scorer.fits(prefix_tokens, t.text, joiners[i]) for i, t in enumerate(terms) if is_plain(t.text)
            }
        else:
            known = {}
        unknown = [i for i in range(len(terms)) if i not in known]
        if unknown:
            known.update(zip(unknown, self._fit_mask([prefix + joiners[i] + terms[i].text for i in unknown])))
        return [i for i in range(len(terms)) if known[i]]

    def fits(self, text: str) -> bool:
        """Whether `text` fits the model's context without truncation (clip-interrogator's
        `_prompt_at_max_len` negated: the last token position must still be padding)."""
        return bool(self._fit_mask([text])[0])

    def _fit_mask(self, texts: list[str]) -> list[bool]:
        return (self.model.tokenizer(texts)[:, -1] == self.model.pad_token_id).tolist()

    def truncate(self, pieces: list[Piece]) -> list[Piece]:
        """clip-interrogator's `_truncate_to_fit`: keep the first piece, then pieces while the prompt fits.

        The original tests `prompt + part` without the ", " it then inserts, and splits the
        prompt on ", " (cutting labels that contain one); this tests the real text, piece by piece.
        """
        kept = pieces[:1]
        for piece in pieces[1:]:
            if not self.fits(join(kept + [piece])):
                break
            kept.append(piece)
        return kept

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode_text(texts, batch_size=self.batch_size, show_progress_bar=False)


def caption_piece(caption: str) -> list[Piece]:
    return [Piece(caption)] if caption else []


def join(pieces: list[Piece]) -> str:
    """The prompt: pieces joined by `, ` (by `，` next to Chinese)."""
    return join_phrases([p.text for p in pieces])
