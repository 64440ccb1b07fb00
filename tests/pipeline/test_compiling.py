"""The torch.compile experiments (pipeline/compiling.py) on the tiny kit, on the CPU."""

from __future__ import annotations

import torch
import torch._dynamo

from pipeline.compiling import CompiledForwards, CompiledGroupNorms
from pipeline.cudagraphs import GraphedForward
from pipeline.tinykit import TINY_TEXT, TINY_UNET, TINY_VAE, build_components, random_controlnet
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


def tiny_unet_and_controlnet():
    unet = build_components(TINY_UNET, TINY_VAE, TINY_TEXT, seed=0)["unet"].eval()
    return unet, random_controlnet(unet, seed=1).eval()


def test_compiled_forwards_trace_each_model_whole_once_then_leave():
    """`aot_eager` traces the graphs inductor would compile, with eager kernels: the CPU compile of
    inductor's C++ takes minutes for these models. The GPU benchmark's trial runs inductor."""
    unet, controlnet = tiny_unet_and_controlnet()
    compiled = CompiledForwards(unet, controlnet, backend="aot_eager")

    def run(batch: int, tokens: int):
        torch.manual_seed(batch)
        latents, timesteps = torch.randn(batch, 4, 8, 8), torch.arange(batch) * 100
        hidden, hint = torch.randn(batch, tokens, 32), torch.rand(batch, 3, 64, 64)
        with torch.no_grad():
            down, mid = controlnet(latents, timesteps, hidden, hint, return_dict=False)
            return unet(latents, timesteps, hidden, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

    expected = [run(2, 77), run(8, 154)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with compiled.installed():
        outputs = [run(2, 77), run(8, 154)]  # batch 1 and 4 with CFG, a two-chunk prompt
    counters = torch._dynamo.utils.counters
    assert counters["frames"]["ok"] == 2 and not counters["graph_break"]  # each model whole, once
    for out, want in zip(outputs, expected):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(unet) and "forward" not in vars(controlnet)


def test_cuda_graphs_capture_the_forward_installed_before_them():
    unet, _ = tiny_unet_and_controlnet()
    compiled = CompiledForwards(unet, backend="aot_eager")
    graphed = GraphedForward(unet, pool=None)
    with compiled.installed():
        with graphed.installed():
            assert unet.forward is graphed and graphed.forward is compiled.forwards[0]
        assert unet.forward is compiled.forwards[0]
    assert "forward" not in vars(unet)
    with graphed.installed():  # on its own: the class's forward
        assert graphed.forward.__func__ is type(unet).forward
    assert "forward" not in vars(unet)
