"""Activation checkpointing and torch.compile applied from outside keep WanDiT's outputs and gradients.

Tiny random WanDiT after a fixed seed, on the CPU; ``aot_eager`` traces through Dynamo and AOT
autograd (the paths compile and checkpointing take) without generating code, one test runs inductor,
and one runs on a GPU when there is one. Also: the benchmark's FLOP formula against PyTorch's FLOP
counter, and its ``--smoke`` run.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from bindweave.model.attention import attention, get_sdpa_backends, set_sdpa_backends
from bindweave.model.dit import CrossAttentionBranch, WanBlock, WanDiT
from bindweave.parallel.per_block import ATTENTION_OPS, apply_activation_checkpointing, apply_compile

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "dit.py"


def tiny_dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(
        in_channels=36, dim=64, ffn_dim=128, num_heads=4, num_layers=2,
        branches=[CrossAttentionBranch("text", 32, "mlp"), CrossAttentionBranch("image", 24, "norm_mlp")],
    )
    torch.nn.init.normal_(dit.head.proj.weight, std=0.02)  # the zero-init head would hide differences
    return dit


def tiny_inputs(device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 36, 3, 4, 6, generator=g)
    t = torch.rand(2, generator=g) * 1000
    context = {"text": torch.randn(2, 7, 32, generator=g), "image": torch.randn(2, 5, 24, generator=g)}
    context_mask = {"text": torch.tensor([[True] * 7, [True] * 4 + [False] * 3])}
    frame_mask = torch.tensor([[True, True, True], [True, True, False]])
    move = lambda v: v.to(device)  # noqa: E731
    return move(x), move(t), {k: move(v) for k, v in context.items()}, \
        {k: move(v) for k, v in context_mask.items()}, move(frame_mask)


def loss_and_grads(model: WanDiT, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, t, context, context_mask, frame_mask = inputs
    model.zero_grad(set_to_none=True)
    out = model(x, t, context, context_mask=context_mask, frame_mask=frame_mask)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------------
# Equality with eager
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_checkpointing_and_compile_keep_outputs_and_gradients(mode, compiled):
    reference = tiny_dit()
    inputs = tiny_inputs()
    expected = loss_and_grads(reference, inputs)

    model = apply_activation_checkpointing(copy.deepcopy(reference), mode)
    if compiled:
        torch._dynamo.reset()
        apply_compile(model, backend="aot_eager")
    assert_same(loss_and_grads(model, inputs), expected)
    assert_same(loss_and_grads(model, inputs), expected)  # second call: cached graphs


def test_compiled_training_survives_a_new_context_length_every_batch():
    """Prompts and reference counts vary, so each batch can bring new context lengths: more of them
    than dynamo's recompile limit (8) must neither fail under fullgraph nor change the numbers."""
    reference = tiny_dit()
    torch._dynamo.reset()
    model = apply_compile(copy.deepcopy(reference), backend="aot_eager")
    x, t, context, _, frame_mask = tiny_inputs()
    for length in range(3, 15):  # 12 lengths
        text = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(length))
        inputs = (x, t, {**context, "text": text}, {"text": torch.ones(2, length, dtype=torch.bool)}, frame_mask)
        assert_same(loss_and_grads(model, inputs), loss_and_grads(reference, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compile_with_selective_checkpointing_keeps_outputs_and_gradients():
    reference = tiny_dit()
    inputs = tiny_inputs()
    expected = loss_and_grads(reference, inputs)
    torch._dynamo.reset()
    model = apply_compile(apply_activation_checkpointing(copy.deepcopy(reference), "selective"))
    assert_same(loss_and_grads(model, inputs), expected, rtol=1e-4, atol=1e-5)


def test_inference_under_checkpointing_matches_eager():
    reference = tiny_dit()
    x, t, context, context_mask, frame_mask = tiny_inputs()
    model = apply_activation_checkpointing(copy.deepcopy(reference), "full")
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, context, context_mask, frame_mask), reference(x, t, context, context_mask, frame_mask)
        )


# ----------------------------------------------------------------------------------------------
# Checkpointing really recomputes (and only what it should)
# ----------------------------------------------------------------------------------------------


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.attention = 0
        self.matmul = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_OPS:
            self.attention += 1
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.matmul += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: WanDiT, inputs) -> tuple[CountOps, CountOps]:
    x, t, context, _, _ = inputs
    with CountOps() as forward:
        out = model(x, t, context)
    with CountOps() as backward:
        out.pow(2).mean().backward()
    return forward, backward


def test_checkpointing_recomputes_what_the_mode_says():
    inputs = tiny_inputs()
    fwd, bwd = count_ops(tiny_dit(), inputs)
    assert fwd.attention == 2 * 3  # self + text + image per block
    eager_backward_matmuls = bwd.matmul
    assert bwd.attention == 0

    fwd, bwd = count_ops(apply_activation_checkpointing(tiny_dit(), "full"), inputs)
    assert bwd.attention == 2 * 3  # the whole block again
    assert bwd.matmul > eager_backward_matmuls

    fwd, bwd = count_ops(apply_activation_checkpointing(tiny_dit(), "selective"), inputs)
    assert bwd.attention == 0  # attention outputs kept ...
    assert bwd.matmul > eager_backward_matmuls  # ... linears recomputed


def saved_bytes(model: WanDiT, inputs) -> int:
    x, t, context, _, _ = inputs
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, context).pow(2).mean()
    return total


def test_full_checkpointing_saves_less():
    # (What selective checkpointing keeps bypasses saved-tensor hooks; its effect is checked above
    # by counting recomputed ops, and its memory on the GPU by benchmarks/dit.py.)
    inputs = tiny_inputs()
    none = saved_bytes(tiny_dit(), inputs)
    full = saved_bytes(apply_activation_checkpointing(tiny_dit(), "full"), inputs)
    assert full < none / 2


# ----------------------------------------------------------------------------------------------
# The model stays the model
# ----------------------------------------------------------------------------------------------


def test_names_and_classes_are_unchanged():
    reference = tiny_dit()
    model = apply_compile(apply_activation_checkpointing(copy.deepcopy(reference), "selective"), backend="eager")
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(isinstance(block, WanBlock) for block in model.blocks)
    model.load_state_dict(reference.state_dict())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Unknown activation checkpointing mode"):
        apply_activation_checkpointing(tiny_dit(), "some")
    with pytest.raises(ValueError, match="save_ops only applies"):
        apply_activation_checkpointing(tiny_dit(), "full", save_ops=list(ATTENTION_OPS))
    model = apply_activation_checkpointing(tiny_dit(), "full")
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(model, "selective")


# ----------------------------------------------------------------------------------------------
# Attention backend selection
# ----------------------------------------------------------------------------------------------


def test_sdpa_backend_setting_leaves_cpu_alone():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, 16) for _ in range(3))
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    expected = attention(q, k, v, mask)
    set_sdpa_backends([SDPBackend.CUDNN_ATTENTION])
    try:
        assert get_sdpa_backends() == [SDPBackend.CUDNN_ATTENTION]
        torch.testing.assert_close(attention(q, k, v, mask), expected)
    finally:
        set_sdpa_backends(None)
    assert get_sdpa_backends() is None
    with pytest.raises(ValueError, match="SDPBackend"):
        set_sdpa_backends(["cudnn"])
    with pytest.raises(ValueError, match="SDPBackend"):
        set_sdpa_backends([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backends", [None, "cudnn"])
def test_gpu_compiled_checkpointed_matches_eager(backends):
    if backends == "cudnn":
        set_sdpa_backends([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                           SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    try:
        reference = tiny_dit().cuda()
        inputs = tiny_inputs("cuda")
        expected = loss_and_grads(reference, inputs)
        for mode in ("none", "full", "selective"):
            torch._dynamo.reset()
            model = apply_compile(apply_activation_checkpointing(copy.deepcopy(reference), mode))
            assert_same(loss_and_grads(model, inputs), expected, rtol=2e-3, atol=2e-4)
    finally:
        set_sdpa_backends(None)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_dit", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_flop_formula_matches_pytorch_flop_counter():
    bench = load_benchmark()
    dit = tiny_dit()
    x, t, context, _, _ = tiny_inputs()
    from torch.utils.flop_counter import FlopCounterMode

    from torch.nn.attention import sdpa_kernel

    # The math backend runs attention as counted matrix products (the CPU flash kernel is not counted).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        dit(x, t, context)
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4
    formula = bench.forward_flops(dit, tokens, {k: v.shape[1] for k, v in context.items()}, batch=x.shape[0])
    assert formula["total"] == pytest.approx(counter.get_total_flops(), rel=1e-9)


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "smoke.json"
    results = load_benchmark().main(["--smoke", "--out", str(out)])
    assert out.exists()
    case = results["cases"][0]
    assert case["parity"]["pass"], case["parity"]
    assert case["parity"]["ours_fp32_vs_diffusers_fp32"] < 1e-5
    ran = [r for r in case["variants"] if "ms" in r]
    assert len(ran) == len(case["variants"]), [r.get("error") for r in case["variants"]]
    for r in ran:
        for key in ("rel_err_vs_ours_eager", "grad_rel_err_vs_reference"):
            assert r.get(key, 0.0) < 2e-2, (r["label"], key, r.get(key))


def test_the_configured_compile_mode_reaches_every_block_and_the_head(monkeypatch):
    from bindweave.training.module import ParallelismConfig
    from tests.helpers import tiny_module

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append((type(self).__name__, kw["mode"])))
    module = tiny_module(parallelism=ParallelismConfig(compile=True, compile_mode="max-autotune"))  # applies it
    assert modes == [("WanBlock", "max-autotune")] * len(module.dit.blocks) + [("OutputHead", "max-autotune")]
    with pytest.raises(ValueError, match="reduce-overhead .* cannot train"):
        ParallelismConfig(compile=True, compile_mode="reduce-overhead")
