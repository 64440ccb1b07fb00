"""Prompts in webui's syntax, which EasyPhoto's defaults and most shared prompts are written in.

`(words)` weighs words x1.1, `[words]` /1.1, `(words:1.3)` x1.3; brackets nest and multiply,
`\\(` is a literal bracket and `BREAK` starts a new chunk. diffusers reads all of that as plain
words, and CLIP reads 77 tokens only. As webui does (its `prompt_parser` and `sd_hijack_clip`):
split the prompt into weighted fragments, tokenize them, cut the tokens into chunks of 75 (a
chunk that would end less than 20 tokens after a comma ends at the comma instead), each with its
start and end token and padded to 77, encode every chunk, multiply each token's embedding by its
weight and scale the chunk back to its mean before weighting, then join the chunks.

Two choices of ours: a prompt is read to at most `MAX_CHUNKS` chunks (225 tokens; the rest is
dropped, as CLIP drops all past 75), so each render signature has few CUDA graphs; and the
prompts encoded together are padded with empty chunks to the longest, since CFG runs the prompt
and the negative prompt in one batch (webui's "pad prompt/negative prompt" option; by default it
runs the two separately when their lengths differ). A prompt with no weights and at most 75
tokens is encoded exactly as diffusers' `encode_prompt` encodes it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# EasyPhoto's DEFAULT_POSITIVE and DEFAULT_NEGATIVE (scripts/easyphoto_config.py, as of its
# cloth and scene LoRA releases): the portraits' default words, and the negative of validation.
EASYPHOTO_POSITIVE = (
    "(cloth:1.5), (best quality), (realistic, photo-realistic:1.3), (detailed skin:1.3), (rough skin:1.3), "
    "(beautiful eyes:1.3), (sparkling eyes:1.3), (beautiful mouth:1.3), finely detail, light smile, "
    "extremely detailed CG unity 8k wallpaper, huge filesize, best quality, realistic, photo-realistic, "
    "ultra high res, raw photo, put on makeup"
)
EASYPHOTO_NEGATIVE = (
    "(bags under the eyes:1.5), (bags under eyes:1.5), (earrings:1.3), (glasses:1.2), (naked:1.5), (nsfw:1.5), "
    "nude, breasts, penis, cum, (over red lips: 1.3), (bad lips: 1.3), (bad ears:1.3), (bad hair: 1.3), "
    "(bad teeth: 1.3), (worst quality:2), (low quality:2), (normal quality:2), lowres, watermark, badhand, "
    "lowres, bad anatomy, bad hands, normal quality, mural"
)

EMPHASIS = 1.1  # what one pair of round brackets multiplies by
CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end tokens
COMMA_BACKTRACK = 20  # a full chunk moves the words after its last comma this near the end on
MAX_CHUNKS = 3
BREAK = None  # the fragment that stands for a BREAK

_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str | None, float]]:
    """The prompt as (fragment, weight) pairs, neighbours of equal weight merged and a BREAK as
    (None, -1); a bracket left open weighs the rest of the prompt, a stray closing one is text,
    and a weight that is no number, `(words:1.2.3)`, counts as plain brackets."""
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[0] is not BREAK:
                fragment[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            weigh(round_open.pop(), float(weight) if _is_number(weight) else EMPHASIS)
        elif token == ")" and round_open:
            weigh(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            weigh(square_open.pop(), 1 / EMPHASIS)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    fragments.append([BREAK, -1.0])
                fragments.append([part, 1.0])
    for start in round_open:
        weigh(start, EMPHASIS)
    for start in square_open:
        weigh(start, 1 / EMPHASIS)
    merged: list[list] = []
    for fragment, weight in fragments:
        if fragment == "":
            continue
        if merged and merged[-1][1] == weight and fragment is not BREAK and merged[-1][0] is not BREAK:
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


def prompt_chunks(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """The prompt's tokens and weights in chunks of at most CHUNK_TOKENS, cut as webui cuts them."""
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for fragment, weight in parse_weights(text):
        if fragment is BREAK:
            next_chunk()
            continue
        for token in tokenizer(fragment, add_special_tokens=False, verbose=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved = (tokens[last_comma + 1 :], weights[last_comma + 1 :])
                tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                next_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK_TOKENS:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks[:MAX_CHUNKS]


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """(len(prompts), 77 x chunks, width) embeddings, every prompt as long as the longest."""
    import torch

    chunked = [prompt_chunks(tokenizer, prompt) for prompt in prompts]
    count = max(len(chunks) for chunks in chunked)
    ids, multipliers = [], []
    for chunks in chunked:
        for tokens, weights in chunks + [([], [])] * (count - len(chunks)):
            padding = CHUNK_TOKENS - len(tokens)
            ids.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
            multipliers.append([1.0, *weights, 1.0] + [1.0] * padding)
    with torch.no_grad():
        encoded = text_encoder(torch.tensor(ids, device=device))[0]
    plain = encoded.float()
    weighted = plain * torch.tensor(multipliers, device=device, dtype=torch.float32)[..., None]
    # Each chunk back to its mean before weighting (webui): weights shift emphasis, not scale.
    # Where a mean is about zero (an encoder whose last norm has no bias) the chunk is left so.
    before, after = plain.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    tiny = 1e-4 * plain.abs().mean(dim=(1, 2), keepdim=True)
    meaningful = (before.abs() > tiny) & (after.abs() > tiny)
    scale = torch.where(meaningful, before / torch.where(meaningful, after, 1.0), 1.0)
    return (weighted * scale).to(encoded.dtype).reshape(len(prompts), count * (CHUNK_TOKENS + 2), -1)
