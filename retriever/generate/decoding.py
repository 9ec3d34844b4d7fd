"""Decoding loops (greedy, sampling, beam search) over any incremental next-token model.

The loops follow open_clip's `CoCa.generate` step for step, so that on the same model they give
the same tokens, but need no transformers: the logits processors and the beam scorer are the
few lines of transformers 4.56 that open_clip uses (MinLength, RepetitionPenalty, TopK, TopP,
BeamSearchScorer), written out here. Like open_clip, beam search ranks beams by summed raw
logits, not log-probabilities.

A `Stepper` takes the newest token of every row and returns next-token logits, keeping its own
key/value cache; `reorder` permutes its rows when beams are reselected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from retriever.errors import RetrieverError

if TYPE_CHECKING:
    import torch

METHODS = ("greedy", "beam", "top_k", "top_p")


class Stepper(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, rows: torch.Tensor) -> None: ...


@dataclass
class DecodeOptions:
    """How to decode. Lengths count the start token, as in open_clip (`min_len` = its `min_seq_len`)."""

    method: str = "beam"
    beams: int = 6
    beam_groups: int = 1
    top_k: int = 50
    top_p: float = 0.9
    temperature: float = 1.0
    min_len: int = 5
    max_len: int = 30
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise RetrieverError(f"unknown decoding method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method == "beam" and (self.beams < 2 or self.beams % self.beam_groups):
            raise RetrieverError(
                f"beam search needs at least 2 beams, divisible by the groups ({self.beams}/{self.beam_groups})"
            )
        if self.max_len <= self.min_len:
            raise RetrieverError(f"max length ({self.max_len}) must exceed min length ({self.min_len})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 1 or self.repetition_penalty <= 0:
            raise RetrieverError("temperature and repetition penalty must be > 0, top_p in (0, 1], top_k >= 1")


def process_logits(input_ids: torch.Tensor, scores: torch.Tensor, opts: DecodeOptions, eos: int) -> torch.Tensor:
    """Minimum length (no end token before `min_len`) and repetition penalty."""
    import torch

    if input_ids.shape[-1] < opts.min_len:
        scores = scores.clone()
        scores[:, eos] = -math.inf
    if opts.repetition_penalty != 1.0:
        seen = torch.gather(scores, 1, input_ids)
        seen = torch.where(seen < 0, seen * opts.repetition_penalty, seen / opts.repetition_penalty)
        scores = scores.scatter(1, input_ids, seen)
    return scores


def warp_logits(scores: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """Top-k or nucleus (top-p) filtering; greedy is top-k with k = 1."""
    import torch

    if opts.method in ("greedy", "top_k"):
        k = 1 if opts.method == "greedy" else min(opts.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, -math.inf)
    if opts.method == "top_p":
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - opts.top_p)
        remove[..., -1:] = False
        return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -math.inf)
    return scores


def sample(stepper: Stepper, batch: int, opts: DecodeOptions, sot: int, eos: int, pad: int = 0) -> torch.Tensor:
    """Greedy or sampled decoding of `batch` rows; returns [batch, length] tokens starting with `sot`."""
    import torch

    generator = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
    out = torch.full((batch, 1), sot, dtype=torch.long)
    while True:
        finished = (out[:, -1] == eos) | (out[:, -1] == pad)
        if finished.all():
            break
        logits = stepper.step(out[:, -1]).float().cpu()
        scores = warp_logits(process_logits(out, logits, opts, eos), opts)
        if out.shape[1] + 1 == opts.max_len:
            nxt = torch.full((batch,), eos, dtype=torch.long)
        elif opts.method == "greedy":
            nxt = scores.argmax(dim=-1)
        else:
            nxt = torch.multinomial(torch.softmax(scores / opts.temperature, dim=-1), 1, generator=generator)[:, 0]
        nxt[finished] = pad
        out = torch.cat([out, nxt[:, None]], dim=1)
        if out.shape[1] >= opts.max_len:
            break
    return out


class _Hypotheses:
    """The n best finished beams of one (image, group), scored by sum / length ** penalty."""

    def __init__(self, size: int, length_penalty: float = 1.0):
        self.size, self.length_penalty = size, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], score_sum: float, length: int) -> None:
        score = score_sum / (length**self.length_penalty)
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum: float, length: int) -> bool:
        return len(self.beams) >= self.size and self.worst >= best_sum / length**self.length_penalty


def beam_search(
    stepper: Stepper, batch: int, opts: DecodeOptions, sot: int, eos: int, pad: int = 0
) -> list[list[list[int]]]:
    """Beam search (with `beam_groups` independent groups); returns each image's finished beams, best first."""
    import torch

    beams, groups = opts.beams, opts.beam_groups
    size = beams // groups
    rows = batch * beams
    input_ids = torch.full((rows, 1), sot, dtype=torch.long)
    beam_scores = torch.full((batch, beams), -1e9)
    beam_scores[:, ::size] = 0  # one live beam per group at the start, so beams do not all repeat it
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(size) for _ in range(batch * groups)]
    done = [False] * (batch * groups)
    group_rows = [
        torch.tensor([b * beams + j for b in range(batch) for j in range(g * size, (g + 1) * size)])
        for g in range(groups)
    ]
    while True:
        logits = stepper.step(input_ids[:, -1]).float().cpu()
        vocab = logits.shape[-1]
        current = torch.zeros(rows, dtype=torch.long)
        reorder = torch.zeros(rows, dtype=torch.long)
        for g, idx in enumerate(group_rows):
            group_ids = input_ids[idx]
            group_logits = logits if groups == 1 else logits[idx]  # rows are already in group order
            if opts.repetition_penalty != 1.0:
                scores = process_logits(group_ids, group_logits, opts, eos) + beam_scores[idx][:, None]
            else:  # the same, with one copy of the [rows, vocab] scores instead of three
                scores = group_logits + beam_scores[idx][:, None]
                if group_ids.shape[-1] < opts.min_len:
                    scores[:, eos] = -math.inf
            top_values, top = torch.topk(scores.view(batch, size * vocab), 2 * size, dim=1)
            top_rows, top_tokens = (top // vocab).tolist(), (top % vocab).tolist()
            top_scores = top_values.tolist()
            cur_len = group_ids.shape[-1] + 1
            # Plain lists while choosing (per-element tensor writes cost more than the choice itself).
            chosen_scores, chosen_tokens, chosen_rows = (
                [0.0] * (batch * size),
                [0] * (batch * size),
                [0] * (batch * size),
            )
            for b in range(batch):
                h = b * groups + g
                if done[h]:
                    chosen_tokens[b * size : (b + 1) * size] = [pad] * size
                    continue
                kept = 0
                for rank, (token, score, row) in enumerate(zip(top_tokens[b], top_scores[b], top_rows[b])):
                    group_row = b * size + row
                    if token == eos:
                        if rank < size:
                            hyps[h].add(group_ids[group_row].tolist(), score, cur_len)
                    else:
                        at = b * size + kept
                        chosen_scores[at], chosen_tokens[at], chosen_rows[at] = score, token, group_row
                        kept += 1
                    if kept == size:
                        break
                done[h] = done[h] or hyps[h].is_done(max(top_scores[b]), cur_len)
            next_scores, next_tokens = torch.tensor(chosen_scores), torch.tensor(chosen_tokens, dtype=torch.long)
            next_rows = torch.tensor(chosen_rows, dtype=torch.long)
            beam_scores[idx] = next_scores
            input_ids[idx] = group_ids[next_rows]
            current[idx] = next_tokens
            reorder[idx] = beams * (next_rows // size) + g * size + next_rows % size
        stepper.reorder(reorder)
        input_ids = torch.cat([input_ids, current[:, None]], dim=1)
        if all(done) or input_ids.shape[1] >= opts.max_len:
            break
    for h in range(batch * groups):
        if not done[h]:
            b, g = divmod(h, groups)
            for j in range(size):
                row = b * beams + g * size + j
                hyps[h].add(input_ids[row].tolist(), beam_scores[row].item(), input_ids.shape[1])
    ranked = []
    for b in range(batch):
        candidates = sorted((beam for h in hyps[b * groups : (b + 1) * groups] for beam in h.beams), key=lambda x: x[0])
        # Finished beams were stored without their end token; like transformers, put it back
        # on every beam shorter than the length limit. Ties: the later beam first, as transformers.
        ranked.append([tokens + [eos] if len(tokens) < opts.max_len else tokens for _, tokens in reversed(candidates)])
    return ranked


def tokens_to_text(tokens: list[int], eos: int, decode) -> str:
    """Tokens after the start token and up to the end token, decoded, with whitespace normalised."""
    body = tokens[1:]
    if eos in body:
        body = body[: body.index(eos)]
    body = [t for t in body if t != 0]
    return " ".join(decode(body).split())
