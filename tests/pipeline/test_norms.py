"""The compiled GroupNorm experiment (pipeline/norms.py) on the tiny kit, compiled for the CPU."""

from __future__ import annotations

import torch
import torch._dynamo

from pipeline.norms import CompiledGroupNorms
from pipeline.tinykit import TINY_TEXT, TINY_UNET, TINY_VAE, build_components
from tests.pipeline.tinykit_fixtures import tiny_kit  # noqa: F401 (sets one CPU thread)


def test_compiled_group_norms_match_pytorch_forward_and_backward_then_leave():
    unet = build_components(TINY_UNET, TINY_VAE, TINY_TEXT, seed=0)["unet"].eval()
    norms = CompiledGroupNorms(unet)
    assert len(norms.norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules()) > 10
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    timesteps, hidden = torch.tensor([10, 500]), torch.randn(2, 77, 32)

    def run():
        latents.grad = None
        out = unet(latents, timesteps, hidden).sample
        out.square().mean().backward()
        return out.detach(), latents.grad.clone()

    expected, expected_grad = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with norms.installed():
        out, grad = run()
        with torch.no_grad():  # another batch and grad mode: compiled variants of the same function
            unet(torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4]), torch.randn(4, 77, 32))
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2  # the compiled function ran
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert not any("forward" in vars(norm) for norm in norms.norms)
