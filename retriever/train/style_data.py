"""A corpus as a style decoder's training data, and held-out reconstruction for `style train --val`.

Lines become CLIP ids (start to end token), a compact vocabulary of the ids the corpus uses, and
padded compact-id rows; their CLIP text embeddings are computed once, before training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.corpus.reader import CorpusReport, iter_corpus
from retriever.generate.style_model import EOT, PAD, SOT

if TYPE_CHECKING:
    from retriever.train.style import StyleEpoch, StyleOptions


def read_lines(
    path: str | Path, column: str | None, emit: Callable[[str, dict], None]
) -> tuple[list[str], CorpusReport]:
    report = CorpusReport()
    lines = [
        text
        for text, _ in iter_corpus(
            path, column=column, report=report, on_bad_row=lambda bad: emit("bad_row", {"row": str(bad)})
        )
    ]
    return lines, report


def clip_ids(clip: Any, lines: list[str], max_tokens: int, chunk: int = 65536) -> list[list[int]]:
    """Each line as CLIP ids from the start token to the end token (truncated to `max_tokens`)."""
    sot, eot = int(clip.tokenizer.sot_token_id), int(clip.tokenizer.eot_token_id)
    out = []
    for start in range(0, len(lines), chunk):
        for row in clip.tokenizer(lines[start : start + chunk]).tolist():
            body = [t for t in row[1:] if t not in (0, eot, sot)][: max_tokens - 2]
            out.append([sot, *body, eot])
    return out


def vocabulary(clip: Any, ids: list[list[int]]) -> list[int]:
    """Compact id -> CLIP id: pad (0), start, end, then every id the corpus uses, in id order."""
    seen = sorted({t for row in ids for t in row[1:-1]})
    return [0, int(clip.tokenizer.sot_token_id), int(clip.tokenizer.eot_token_id), *seen]


def compact(ids: list[list[int]], vocab: list[int]) -> Any:
    """[lines, longest] compact ids, padded with PAD; a CLIP id outside the vocabulary is dropped."""
    import torch

    index = {clip_id: i for i, clip_id in enumerate(vocab)}
    rows = [[SOT] + [index[t] for t in row[1:-1] if t in index] + [EOT] for row in ids]
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def embed(clip: Any, lines: list[str], show_progress_bar: bool | None) -> Any:
    import torch

    from retriever.models.encoder import Encoder

    return torch.from_numpy(Encoder(clip).encode_text(lines, show_progress_bar=show_progress_bar))


def validation_data(
    clip: Any,
    lines: list[str],
    vocab: list[int],
    max_tokens: int,
    options: StyleOptions,
    show_progress_bar: bool | None,
) -> dict:
    """Held-out lines' embeddings and compact tokens, with each line as the decoder could write it."""
    lines = lines[: options.eval_lines]
    ids = clip_ids(clip, lines, max_tokens)
    decode = clip.tokenizer.decode
    return {
        "embeddings": embed(clip, lines, show_progress_bar),
        "tokens": compact(ids, vocab),
        "targets": [" ".join(decode(row[1:-1]).split()) for row in ids],
        "to_text": lambda body: decode([vocab[t] for t in body]),
        "device": str(clip.device),
    }


def evaluate(decoder: Any, data: dict, options: StyleOptions, report: StyleEpoch, batch_size: int = 256) -> None:
    """Validation loss, and the share of held-out lines that greedy decoding of their (clean) text
    embedding writes back exactly."""
    import torch
    from torch.nn import functional as F

    from retriever.generate.decoding import DecodeOptions, sample, tokens_to_text
    from retriever.generate.style_model import StyleStepper

    decoder.eval()
    device = data["device"]
    total, count, exact = 0.0, 0, 0
    opts = DecodeOptions(method="greedy", min_len=1, max_len=decoder.config.max_tokens)
    with torch.inference_mode():
        for start in range(0, len(data["targets"]), batch_size):
            emb = data["embeddings"][start : start + batch_size].to(device)
            tokens = data["tokens"][start : start + batch_size].to(device)
            logits = decoder(emb, tokens[:, :-1])
            targets = tokens[:, 1:]
            n = int((targets != PAD).sum())
            total += (
                float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)) * n
            )
            count += n
            rows = sample(StyleStepper(decoder, emb, 1, opts.max_len), len(emb), opts, SOT, EOT, PAD).tolist()
            written = [tokens_to_text(row, EOT, data["to_text"]) for row in rows]
            exact += sum(w == t for w, t in zip(written, data["targets"][start : start + batch_size]))
    report.val_loss = total / count if count else None
    report.exact_match = exact / len(data["targets"]) if data["targets"] else None
    decoder.train()
