"""Sampling speed options on the CPU: the first-block step cache, DiT block offload, the FP8 fallback."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from bindweave.inference.dit_offload import DiTOffloadConfig, apply_dit_offload
from bindweave.inference.fp8 import apply_fp8
from bindweave.inference.sampler import SamplingConfig, sample_videos
from bindweave.inference.step_cache import FirstBlockCache, StepCacheConfig
from tests.helpers import synthetic_batch, tiny_module


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    module = tiny_module(num_steps=5, guidance_scale=4.0)
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)  # outputs depend on the DiT
    return module


def final_latents(module, batch, config: SamplingConfig) -> tuple[torch.Tensor, int]:
    """The latent handed to the VAE, and how many DiT calls ran their second block (full steps)."""
    latents, calls = {}, []
    decode, second = module.vae.decode, module.dit.blocks[1].forward
    module.vae.decode = lambda x, **kwargs: (latents.setdefault("x", x.clone()), decode(x, **kwargs))[1]
    module.dit.blocks[1].forward = lambda *a, **k: (calls.append(1), second(*a, **k))[1]
    try:
        sample_videos(module.model, batch, config)
    finally:
        del module.vae.decode, module.dit.blocks[1].forward  # back to the class methods
    return latents["x"], len(calls)


def test_threshold_zero_is_bit_identical_and_a_large_one_skips(module):
    batch = synthetic_batch(size=2, with_video=False)
    plain, full = final_latents(module, batch, module.sampling)
    assert full == 5
    cached, full = final_latents(module, batch, replace(module.sampling, step_cache=StepCacheConfig(threshold=0.0)))
    assert full == 5 and torch.equal(cached, plain)
    skipping, full = final_latents(module, batch, replace(module.sampling, step_cache={"threshold": 1e9}))
    assert full == 1 and not torch.equal(skipping, plain)  # the first step fills the cache, four reuse it
    config = replace(module.sampling, step_cache=StepCacheConfig(threshold=1e9, warmup_steps=2, max_skips=1))
    assert final_latents(module, batch, config)[1] == 3  # full, full, skip, full, skip


def test_each_video_starts_a_fresh_cache_whatever_its_shape(module):
    """1–4 references and other sizes between requests: the cache is per video and keyed by shape."""
    config = replace(module.sampling, step_cache=StepCacheConfig(threshold=0.3))
    two = synthetic_batch(size=1, with_video=False, max_references=2, start=1)
    one = synthetic_batch(size=1, with_video=False, max_references=1, start=5)
    first, full = final_latents(module, two, config)
    final_latents(module, one, config)
    final_latents(module, one, replace(config, height=48, num_frames=9))
    again, full_again = final_latents(module, two, config)
    assert torch.equal(first, again) and full == full_again


def test_cfg_halves_and_requests_are_decided_together():
    from tests.test_dit import inputs, tiny_dit

    torch.manual_seed(0)
    dit = tiny_dit().eval()
    x, t, ctx = inputs(dit, frames=2)  # batch 2: the conditional and unconditional halves
    cache = FirstBlockCache(StepCacheConfig(threshold=0.05))

    def call(x):
        with torch.no_grad():
            b = x.shape[0]
            state = dit.embed(x, t[:b], {name: c[:b] for name, c in ctx.items()})
            return dit.unembed(cache.run_blocks(dit, state.tokens, state), state)

    first = call(x)
    same = call(x.clone())
    assert cache.steps == [True, False] and cache.deltas == [0.0]
    torch.testing.assert_close(same, first)  # reused residual: the same output for an unchanged input
    moved = x.clone()
    moved[1] += 3 * torch.randn_like(moved[1])  # only the second half moves
    call(moved)
    assert cache.steps == [True, False, True]  # one decision for both halves: the larger change wins
    assert cache.deltas[-1] > 0.05
    cache.reset()
    assert cache.steps == [] and cache.first_residual is None
    call(x[:1])  # another batch: a full step
    assert cache.steps == [True]


def test_bad_step_cache_settings_raise():
    with pytest.raises(ValueError, match="kind"):
        StepCacheConfig(kind="tea")
    with pytest.raises(ValueError, match="threshold"):
        StepCacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="group_size"):
        DiTOffloadConfig(group_size=0)


def test_dit_offload_gives_the_same_video(caplog):
    """Block offload through diffusers' group-offloading hooks (CPU: onload and offload device are
    both the CPU, so the hooks run but copy nothing) changes nothing; with the step cache too."""
    torch.manual_seed(0)
    module = tiny_module(num_steps=3, guidance_scale=4.0)
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)
    batch = synthetic_batch(size=2, with_video=False)
    plain, _ = final_latents(module, batch, module.sampling)
    cached, _ = final_latents(module, batch, replace(module.sampling, step_cache={"threshold": 0.2}))
    with caplog.at_level(logging.WARNING, logger="bindweave.inference.dit_offload"):
        offloaded, full = final_latents(module, batch, replace(module.sampling, dit_offload={"group_size": 1}))
    assert "needs a CUDA device" in caplog.text  # use_stream (the default) dropped on the CPU
    assert full == 3 and torch.equal(offloaded, plain)
    assert hasattr(module.dit.blocks[0], "_diffusers_hook")  # the hooks are in place
    both, _ = final_latents(module, batch, replace(module.sampling, dit_offload={"group_size": 1},
                                                   step_cache={"threshold": 0.2}))
    assert torch.equal(both, cached)
    stack = apply_dit_offload(module.dit, torch.device("cpu"), DiTOffloadConfig())
    assert apply_dit_offload(module.dit, torch.device("cpu"), DiTOffloadConfig()) is stack
    with pytest.raises(ValueError, match="already offloaded"):
        apply_dit_offload(module.dit, torch.device("cpu"), DiTOffloadConfig(group_size=2))
    assert set(module.dit.state_dict()) == set(tiny_module().dit.state_dict())  # no new keys


def test_fp8_falls_back_with_one_line_on_the_cpu(module, caplog):
    batch = synthetic_batch(size=1, with_video=False)
    plain, _ = final_latents(module, batch, module.sampling)
    with caplog.at_level(logging.WARNING, logger="bindweave.inference.fp8"):
        fp8, _ = final_latents(module, batch, replace(module.sampling, fp8=True))
    assert torch.equal(fp8, plain)
    assert "FP8 linears need a CUDA GPU" in caplog.text and len(caplog.records) == 1
    assert "CUDA GPU" in apply_fp8(module.dit)


def _agreement_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    previous = torch.ones(2, 4, 3)  # this rank's shard (sequence) or samples (batch) at the last full step
    now = previous + (rank == 1)  # only rank 1's part moved
    deltas = {}
    for kind in ("sequence", "batch"):
        cache = FirstBlockCache(StepCacheConfig(), **{f"{kind}_group": group})
        cache.first_residual = previous
        deltas[kind] = cache.change(now)
    gathered = [None] * world
    dist.all_gather_object(gathered, deltas)
    if rank == 0:
        torch.save(gathered, path)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned ranks: ~40 s on 2 loaded cores
def test_ranks_agree_on_the_skip_decision(tmp_path):
    """Sequence parallelism sums the metric's parts over the ranks' shards; CFG parallelism takes the
    largest change of any rank's samples: every rank gets the same δ, so the same decision."""
    from tests.test_distributed import _spawn

    out = str(tmp_path / "deltas.pt")
    _spawn(_agreement_worker, 2, out)
    ranks = torch.load(out, weights_only=False)
    assert ranks[0] == ranks[1]
    assert ranks[0]["sequence"] == pytest.approx(0.5)  # Σ|Δ| over both shards / Σ|r| over both: 24 / 48
    assert ranks[0]["batch"] == pytest.approx(1.0)  # rank 1's samples moved by 100 %
