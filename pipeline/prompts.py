"""Prompts in webui's syntax, which EasyPhoto's defaults and most shared prompts are written in.

`(words)` weighs words x1.1, `[words]` /1.1, `(words:1.3)` x1.3; brackets nest and multiply,
and `\\(` is a literal bracket. diffusers reads all of that as plain words, and CLIP reads 77
tokens only. As webui does: split the prompt into weighted fragments, tokenize them, cut the
tokens into chunks of 75, each with its start and end token and padded to 77, encode every
chunk, multiply each token's embedding by its weight and scale the chunk back to its mean
before weighting, then join the chunks. Prompts encoded together are padded with empty chunks
to the longest, as CFG needs one length. A prompt with no weights and at most 75 tokens is
encoded exactly as diffusers' `encode_prompt` encodes it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EMPHASIS = 1.1  # what one pair of round brackets multiplies by
CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end tokens

_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The prompt as (fragment, weight) pairs, neighbours of equal weight merged; a bracket left
    open weighs the rest of the prompt, a stray closing one is read as text."""
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            fragments.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open and _is_number(weight):
            weigh(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            weigh(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            weigh(square_open.pop(), 1 / EMPHASIS)
        else:
            fragments.append([token, 1.0])
    for start in round_open:
        weigh(start, EMPHASIS)
    for start in square_open:
        weigh(start, 1 / EMPHASIS)
    merged: list[list] = []
    for fragment, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    tokens: list[int] = []
    weights: list[float] = []
    for fragment, weight in parse_weights(text):
        ids = tokenizer(fragment, add_special_tokens=False).input_ids
        tokens += ids
        weights += [weight] * len(ids)
    return tokens, weights


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """(len(prompts), 77 x chunks, width) embeddings, every prompt as long as the longest."""
    import torch

    weighted = [_weighted_tokens(tokenizer, prompt) for prompt in prompts]
    chunks = max([1, *(math.ceil(len(tokens) / CHUNK_TOKENS) for tokens, _ in weighted)])
    ids, multipliers = [], []
    for tokens, weights in weighted:
        for start in range(0, chunks * CHUNK_TOKENS, CHUNK_TOKENS):
            part, part_weights = tokens[start : start + CHUNK_TOKENS], weights[start : start + CHUNK_TOKENS]
            padding = CHUNK_TOKENS - len(part)
            ids.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
            multipliers.append([1.0, *part_weights, 1.0] + [1.0] * padding)
    with torch.no_grad():
        encoded = text_encoder(torch.tensor(ids, device=device))[0]
    weights = torch.tensor(multipliers, device=device, dtype=torch.float32)[..., None]
    plain = encoded.float()
    weighted_embeddings = plain * weights
    # Each chunk back to its mean before weighting (webui): weights shift emphasis, not scale.
    # Where that mean is about zero (an encoder whose last norm has no bias) it is left alone.
    before, after = plain.mean(dim=(1, 2), keepdim=True), weighted_embeddings.mean(dim=(1, 2), keepdim=True)
    meaningful = after.abs() > 1e-4 * plain.abs().mean(dim=(1, 2), keepdim=True)
    scale = torch.where(meaningful, before / torch.where(meaningful, after, 1.0), 1.0)
    embeddings = (weighted_embeddings * scale).to(encoded.dtype)
    return embeddings.reshape(len(prompts), chunks * (CHUNK_TOKENS + 2), -1)
