"""webui's prompt syntax on the tiny kit's text encoder, against diffusers' own prompt encoding."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models import load_models
from pipeline.prompts import CHUNK_TOKENS, EMPHASIS, MAX_CHUNKS, prompt_chunks, encode_prompts, parse_weights
from tests.pipeline.tinykit_fixtures import tiny_kit  # noqa: F401 (fixture; also sets one CPU thread)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a photo", [("a photo", 1.0)]),
        ("a (red:1.5) scarf", [("a ", 1.0), ("red", 1.5), (" scarf", 1.0)]),
        ("(over red lips: 1.3)", [("over red lips", 1.3)]),
        ("(best) [lowres]", [("best", EMPHASIS), (" ", 1.0), ("lowres", 1 / EMPHASIS)]),
        ("((nested))", [("nested", EMPHASIS * EMPHASIS)]),
        ("(a, (b:2):1.5)", [("a, ", 1.5), ("b", 3.0)]),
        (r"\(literal\) (x)", [("(literal) ", 1.0), ("x", EMPHASIS)]),
        ("open (to the end", [("open ", 1.0), ("to the end", EMPHASIS)]),
        ("stray) and a:colon", [("stray) and a:colon", 1.0)]),
        (r"a\b", [("ab", 1.0)]),
        ("", []),
        ("()", []),
        ("(a:1.) (b:.5)", [("a ", 1.0), ("b", 0.5)]),
        ("face BREAK (hair:1.2)", [("face", 1.0), (None, -1.0), ("hair", 1.2)]),
        ("(not a weight:1.2.3) then", [("not a weight", EMPHASIS), (" then", 1.0)]),  # webui raises
    ],
)
def test_prompt_weights_are_parsed_as_webui_does(text, expected):
    parsed = parse_weights(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.fixture(scope="module")
def pipe(tiny_kit):
    """The tiny kit's text encoder; its last norm gets a bias, so that, as in SD1.5's CLIP, its
    outputs do not average to zero (the tiny kit's are centred, and leave the mean alone)."""
    from diffusers import StableDiffusionPipeline

    models = load_models(tiny_kit, "cpu")
    text_encoder = copy.deepcopy(models.text_encoder)
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.fill_(0.2)
    return StableDiffusionPipeline(
        vae=models.vae, text_encoder=text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=models.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def encode(pipe, prompts):
    return encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, "cpu")


def test_a_plain_short_prompt_is_encoded_as_diffusers_encodes_it(pipe):
    prompts = ["phb person, a photo", "a portrait in the rain"]
    expected, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert torch.equal(encode(pipe, prompts), expected)


def test_weights_scale_their_tokens_and_the_chunk_keeps_its_mean(pipe):
    plain = encode(pipe, ["a red scarf"])[0]
    weighted = encode(pipe, ["a (red:1.5) scarf"])[0]
    red = slice(1 + len(pipe.tokenizer("a ", add_special_tokens=False).input_ids), None)
    red = slice(red.start, red.start + len(pipe.tokenizer("red", add_special_tokens=False).input_ids))
    rescale = weighted[0, 0] / plain[0, 0]  # the start token: weight 1, rescaled only
    torch.testing.assert_close(weighted[red], plain[red] * 1.5 * rescale)
    torch.testing.assert_close(weighted[red.stop :], plain[red.stop :] * rescale)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert not torch.allclose(rescale, torch.ones(()))


def test_long_prompts_are_read_to_the_end_and_padded_together(pipe):
    words = "a very long prompt about a portrait, " * 6  # the tiny tokenizer spells it byte by byte
    long_tokens = len(pipe.tokenizer(words, add_special_tokens=False).input_ids)
    assert long_tokens > 2 * CHUNK_TOKENS
    embeddings = encode(pipe, [words, "short"])
    assert embeddings.shape[:2] == (2, 3 * (CHUNK_TOKENS + 2))
    # Each chunk is encoded on its own: the short prompt's first chunk is its whole encoding,
    # then empty chunks; the long one's last chunk changes with the words at the end.
    torch.testing.assert_close(embeddings[1, : CHUNK_TOKENS + 2], encode(pipe, ["short"])[0])
    torch.testing.assert_close(embeddings[1, CHUNK_TOKENS + 2 :], encode(pipe, [""])[0].repeat(2, 1))
    changed_end = encode(pipe, [words + "red scarf", "short"])
    assert not torch.allclose(changed_end[0, -(CHUNK_TOKENS + 2) :], embeddings[0, -(CHUNK_TOKENS + 2) :])


def test_a_centred_encoder_keeps_its_weighted_tokens_unrescaled(tiny_kit):
    models = load_models(tiny_kit, "cpu")
    words = len(models.tokenizer("a red scarf", add_special_tokens=False).input_ids)
    plain = encode_prompts(models.tokenizer, models.text_encoder, ["a red scarf"], "cpu")[0]
    weighted = encode_prompts(models.tokenizer, models.text_encoder, ["(a red scarf:1.5)"], "cpu")[0]
    assert abs(float(plain.mean())) < 1e-6 and torch.isfinite(weighted).all()
    torch.testing.assert_close(weighted[1 : 1 + words], plain[1 : 1 + words] * 1.5)
    torch.testing.assert_close(weighted[1 + words :], plain[1 + words :])


def test_a_full_chunk_ends_at_a_near_comma_and_break_starts_a_new_one(pipe):
    tokenizer = pipe.tokenizer
    near = prompt_chunks(tokenizer, "x" * 60 + ", " + "y" * 20)  # 60 tokens, the comma, 20 more
    assert [len(tokens) for tokens, _ in near] == [61, 20]  # the words after the comma moved on whole
    far = "x" * 40 + ", " + "y" * 50  # the comma 34 tokens before the chunk's end: cut at 75
    total = len(tokenizer(far, add_special_tokens=False).input_ids)
    assert [len(tokens) for tokens, _ in prompt_chunks(tokenizer, far)] == [CHUNK_TOKENS, total - CHUNK_TOKENS]
    broken = prompt_chunks(tokenizer, "face BREAK hair")
    assert [tokenizer.decode(tokens) for tokens, _ in broken] == ["face", "hair"]


def test_prompts_past_the_chunk_limit_are_cut(pipe):
    endless = "a portrait, " * 200
    embeddings = encode(pipe, [endless])
    assert embeddings.shape[1] == MAX_CHUNKS * (CHUNK_TOKENS + 2)
