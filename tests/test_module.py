"""The LightningModule: loss, reference slots, CFG batching, encoder call counts, bad inputs."""

from dataclasses import replace
from functools import partial

import pytest
import torch

from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.model.flow import foreground_weights
from bindweave.inference.sampler import decode
from conditioners import RelationalConditioner
from conditioners.base import merge
from encoders import T5TextEncoder
from tests.helpers import TINY_DIT, hand_null_conditioning, synthetic_batch, tiny_module, valid_tokens
from tests.tiny_parts import tiny, tiny_factory


def fixed_loss(module, batch, repeats=4):
    """Flow loss averaged over fixed noise/timestep draws (same draws every call)."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return torch.stack([module.flow_loss(batch) for _ in range(repeats)]).mean()


def test_reference_slots_are_excluded_from_the_loss():
    module = tiny_module()
    batch = synthetic_batch()
    baseline = fixed_loss(module, batch)
    original = module.dit.forward

    def corrupt_slots(*args, **kwargs):
        out = original(*args, **kwargs).clone()
        out[:, :, 2:] += 1e3  # latent T = 2 frames for 5 video frames; slots follow
        return out

    module.dit.forward = corrupt_slots
    torch.testing.assert_close(fixed_loss(module, batch), baseline)


@pytest.mark.parametrize("prediction", ["velocity", pytest.param("sample", marks=pytest.mark.slow)])  # sample: -m slow
def test_loss_on_a_fixed_batch_falls_by_half(prediction):
    module = tiny_module(prediction=prediction)
    batch = synthetic_batch(size=2)
    before = fixed_loss(module, batch).item()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        module.flow_loss(batch).backward()
        optimizer.step()
    after = fixed_loss(module, batch).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_sample_prediction_of_the_data_samples_the_data(sampler):
    """A DiT that outputs the clean latent x0 (prediction="sample") makes every sampler land on x0:
    the output is turned into a velocity with the scheduler's own σ at each step, for both CFG sides."""
    module = tiny_module(num_steps=5, prediction="sample")
    module.sampling = replace(module.sampling, sampler=sampler)
    batch = synthetic_batch(size=2)
    x0 = module.vae.encode(batch["video"])  # (B, z, T, h, w)
    num_slots = 2

    def exact_sample(x, *args, **kwargs):  # (2B, C_in, T+N, h, w) -> (2B, z, T+N, h, w)
        target = torch.cat([x0, x0])
        return torch.cat([target, target[:, :, :num_slots]], dim=2).to(x.dtype)

    module.dit.forward = exact_sample
    expected = decode(module.vae, x0)
    assert (module.generate(batch).int() - expected.int()).abs().max() <= 1


@pytest.mark.slow  # a convergence run (~30 s on 2 cores): `pytest -m slow`
@pytest.mark.parametrize("prediction, steps, bound", [("velocity", 300, 0.8), ("sample", 150, 0.25)])
def test_a_model_fit_to_one_sample_samples_it_back(prediction, steps, bound, monkeypatch):
    """Training and sampling agree end to end: after fitting one sample, sampling its own conditions
    (guidance 1) lands near its latent. x0-prediction gets there in half the steps, much closer
    (relative errors seen: velocity 3.16 -> 0.54 after 300 steps, sample 1.00 -> 0.15 after 150)."""
    import bindweave.inference.sampler as sampling

    monkeypatch.setattr(sampling, "decode", lambda vae, latents, **kwargs: latents)  # compare latents
    torch.manual_seed(0)
    module = tiny_module(num_steps=10, guidance_scale=1.0, prediction=prediction, timestep_sampling="logit_normal",
                         flow_shift=3.0)
    module.sampling = replace(module.sampling, shift=3.0)
    batch = synthetic_batch(size=1)
    x0 = module.vae.encode(batch["video"])  # (1, z, T, h, w)

    def relative_error() -> float:
        return ((module.generate(batch) - x0).norm() / x0.norm()).item()

    before = relative_error()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        module.flow_loss(batch).backward()
        optimizer.step()
    after = relative_error()
    assert after < bound and after < 0.8 * before, (before, after)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="prediction must be 'velocity' or 'sample'"):
        tiny_module(prediction="epsilon")


def test_only_trainable_parts_get_optimised():
    module = tiny_module()
    optimizer = module.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, p in module.model.named_parameters():
        assert (id(p) in trained) == (name.startswith("dit.") or ".connector." in name), name
    assert optimizer.defaults["lr"] == 5e-6


def test_lr_multipliers_give_parts_their_own_learning_rate_under_the_schedule():
    """``lr_multipliers``: the longest matching prefix sets a part's multiple of the optimizer's rate;
    the LR schedule scales every group alike; an unknown prefix or a non-positive multiple is one line."""
    from functools import partial as bind

    from bindweave.errors import UserError
    from callbacks.schedule import LRSchedule

    module = tiny_module(optimizer=bind(torch.optim.AdamW, lr=1e-3),
                         lr_multipliers={"model.dit": 0.5, "model.dit.blocks.0": 0.1})
    optimizer = module.configure_optimizers()
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(module.named_parameters())
    assert len(rate) == sum(p.requires_grad for p in named.values())  # every trainable parameter, once
    for name, p in named.items():
        if not p.requires_grad:
            continue
        want = 1e-4 if name.startswith("model.dit.blocks.0.") else 5e-4 if name.startswith("model.dit.") else 1e-3
        assert rate[id(p)] == pytest.approx(want), name
    assert any(".connector." in n for n, p in named.items() if p.requires_grad)  # left at the optimizer's own rate
    from types import SimpleNamespace

    schedule = LRSchedule(warmup_steps=4, total_steps=10)
    trainer = SimpleNamespace(global_step=1, max_steps=10, log_every_n_steps=1000, optimizers=[optimizer])
    schedule.on_train_batch_start(trainer, SimpleNamespace(log=lambda *a, **k: None), None, 0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.5 * x for x in (1e-4, 5e-4, 1e-3)])
    with pytest.raises(UserError, match="'model.dit.block' names no trainable parameter"):
        tiny_module(lr_multipliers={"model.dit.block": 2.0}).configure_optimizers()  # a whole name part, not a prefix
    with pytest.raises(UserError, match="positive multiple"):
        tiny_module(lr_multipliers={"model.dit": 0.0})


def test_checkpoint_holds_trainable_weights_only():
    module = tiny_module()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("model.dit.") for k in keys) and any(".connector." in k for k in keys)
    assert not any(k.startswith("model.vae.") or ".text_encoder." in k or ".mllm." in k or ".image_encoder." in k for k in keys)
    del checkpoint["state_dict"]["model.dit.head.proj.weight"]
    with pytest.raises(ValueError, match="dit.head.proj.weight"):
        module.on_load_checkpoint(checkpoint)


def test_generate_shape_and_seed_reproducibility():
    module = tiny_module(num_steps=2)
    batch = synthetic_batch(size=2, with_video=False)
    first, second = module.generate(batch), module.generate(batch)
    assert first.shape == (2, 5, 32, 32, 3) and first.dtype == torch.uint8
    assert torch.equal(first, second)
    batch["seed"] = [7, 8]
    assert not torch.equal(first, module.generate(batch))


def test_batched_cfg_equals_two_separate_passes():
    module = tiny_module(num_steps=3, guidance_scale=4.0)
    # A non-zero output head, so the DiT's prediction actually depends on the conditions.
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)
    for c in module.conditioners.values():
        if getattr(c, "connector", None) is not None:
            torch.nn.init.normal_(c.connector[2].weight, std=0.5)
    batch = synthetic_batch(size=2, with_video=False)
    batched = module.generate(batch)

    # Reference: the conditional and unconditional passes as separate DiT calls, unpadded.
    features = module.model.encode_features(batch)
    parts = [c.condition(batch, features[name]) for name, c in module.conditioners.items()]
    # The unconditional side built by hand from the encoders (not with the code under test).
    cond, uncond = merge(parts), hand_null_conditioning(module, batch)
    s = module.sampling
    x = torch.stack([torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(seed)) for seed in batch["seed"]])
    sigmas = torch.linspace(1, 0, s.num_steps + 1)
    sigmas = s.shift * sigmas / (1 + (s.shift - 1) * sigmas)

    def velocity(c, x, sigma):
        dit_in, frame_mask = module.model.assemble_input(x, c)
        context, mask = module.model.context(c)
        return module.dit(dit_in, (sigma * 1000).expand(x.shape[0]), context, mask, frame_mask)[:, :, :2]

    with torch.no_grad():
        for i in range(s.num_steps):
            v_c, v_u = velocity(cond, x, sigmas[i]), velocity(uncond, x, sigmas[i])
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + s.guidance_scale * (v_c - v_u))
        video = module.vae.decode(x)
    expected = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert (batched.int() - expected.int()).abs().max() <= 1


def test_the_unconditional_side_nulls_the_prompt_and_keeps_the_references():
    """CFG's unconditional side: the guided relational condition is the empty prompt read without
    images on every row; the identity tokens and reference slots (``guided=False``) are the
    conditional ones, unchanged. Compared with a null condition built by hand from the encoders."""
    module = tiny_module()
    torch.nn.init.normal_(module.conditioners["relational"].connector[2].weight, std=0.5)
    batch = synthetic_batch(size=2, with_video=False)
    features = module.model.encode_features(batch)
    parts = [c.condition(batch, features[name]) for name, c in module.conditioners.items()]
    uncond, expected = module.model.null_conditions(batch, features, parts), hand_null_conditioning(module, batch)
    assert set(uncond.context) == set(expected.context) == {"text", "image"}
    for i in range(2):
        torch.testing.assert_close(valid_tokens(uncond.context["text"], i), valid_tokens(expected.context["text"], i))
    torch.testing.assert_close(uncond.context["image"].mask, expected.context["image"].mask,
                               msg="the unconditional side must keep the references' CLIP tokens (guided=False)")
    torch.testing.assert_close(uncond.context["image"].tokens, expected.context["image"].tokens)
    torch.testing.assert_close(uncond.slots, expected.slots,
                               msg="the unconditional side must keep the reference slots (guided=False)")
    assert expected.slots.abs().max() > 0 and expected.context["image"].mask.any()  # references to keep


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_drops_each_condition_with_its_own_probability():
    """``training_step`` drops conditioner i's condition for a sample with probability ``dropout``
    (20 000 draws: the share is within ~5 standard deviations, 0.01 at p = 0.1); dropout 0 draws none."""
    from bindweave.training.module import BindWeave
    from conditioners import IdentityConditioner, MultiReferenceConditioner
    from encoders import CLIPVisionEncoder

    module = BindWeave(dit=None, vae=None, relational=tiny(RelationalConditioner),  # nothing is built
                       identity=IdentityConditioner(image_encoder=tiny_factory(CLIPVisionEncoder), dropout=0.3),
                       multi_reference=MultiReferenceConditioner(dropout=0.0))
    assert module.conditioners["relational"].dropout == 0.1  # the paper's rate, RelationalConditioner's default
    seen = []
    module.flow_loss = lambda batch, drops=None, generator=None: (seen.append(drops), torch.zeros(()))[1]
    n = 20000
    module.training_step({"prompt": [""] * n}, 0)
    relational, identity, references = seen[0]
    assert len(relational) == len(identity) == n and references is None
    assert abs(sum(relational) / n - 0.1) < 0.01, sum(relational) / n
    assert abs(sum(identity) / n - 0.3) < 0.015, sum(identity) / n


def _timesteps_seen(dit) -> list[torch.Tensor]:
    """The ``timestep`` argument of every call of ``dit`` from now on."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append((args[1] if len(args) > 1 else kwargs["timestep"]).detach().clone())

    dit.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_training_runs_the_dit_at_t_1000_sigma(monkeypatch):
    module = tiny_module()
    seen = _timesteps_seen(module.dit)
    monkeypatch.setattr(module.flow, "sample_sigmas", lambda *args, **kwargs: torch.tensor([0.3, 0.7]))
    module.flow_loss(synthetic_batch(size=2))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], torch.tensor([300.0, 700.0]), msg="training must call the DiT at t = 1000·σ")


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_sampling_runs_the_dit_at_t_1000_sigma(sampler):
    """The timesteps the sampler gives the DiT, from the closed-form grid: Euler at σ = 1, 2/3, 1/3
    shifted by 5 (5σ/(1 + 4σ): 1, 10/11, 5/7); UniPC at diffusers' flow grid linspace(1, 1/1000, 4)[:3]
    shifted the same way, its timesteps truncated to integers (within 1 of 1000·σ)."""
    module = tiny_module(num_steps=3, guidance_scale=4.0)
    module.sampling = replace(module.sampling, sampler=sampler, shift=5.0)
    seen = _timesteps_seen(module.dit)
    module.generate(synthetic_batch(size=2, with_video=False))
    assert len(seen) == 3 and all(t.shape == (4,) for t in seen)  # both CFG halves of 2 videos per step
    if sampler == "euler":
        expected = torch.tensor([1000.0, 10000 / 11, 5000 / 7])
        torch.testing.assert_close(torch.stack([t[0] for t in seen]), expected,
                                   msg="sampling must call the DiT at t = 1000·σ")
    else:
        grid = torch.linspace(1, 1 / 1000, 4, dtype=torch.float64)[:-1]
        expected = 1000 * 5 * grid / (1 + 4 * grid)
        assert (torch.stack([t[0] for t in seen]).double() - expected).abs().max() <= 1, (seen, expected)
    assert all((t == t[0]).all() for t in seen)


def test_encoders_run_once_per_video_not_per_step():
    calls = {}

    def count(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    for steps in (2, 5):
        module = tiny_module(num_steps=steps)
        relational, identity = module.conditioners["relational"], module.conditioners["identity"]
        calls.clear()
        relational.text_encoder.register_forward_hook(count("t5"))
        relational.mllm.register_forward_hook(count("mllm"))
        identity.image_encoder.register_forward_hook(count("clip"))
        encode_images = module.vae.encode_images
        module.vae.encode_images = lambda *a: (count("vae")(), encode_images(*a))[1]
        dit_calls = []
        module.dit.register_forward_hook(lambda *_: dit_calls.append(1))
        module.generate(synthetic_batch(size=2, with_video=False))
        # Conditional + null prompt for T5 and MLLM; references encoded once; one DiT call per step.
        assert calls == {"t5": 2, "mllm": 2, "clip": 1, "vae": 1}, calls
        assert len(dit_calls) == steps
        # The null condition's features are kept: a second video runs each encoder once.
        calls.clear()
        module.generate(synthetic_batch(size=2, with_video=False))
        assert calls == {"t5": 1, "mllm": 1, "clip": 1, "vae": 1}, calls


def test_bad_requests_raise_clear_errors():
    module = tiny_module()
    batch = synthetic_batch(size=1, with_video=False)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        module.generate({**batch, "num_frames": [6]})
    with pytest.raises(ValueError, match="multiple of 16"):
        module.generate({**batch, "height": [40], "width": [40]})
    with pytest.raises(ValueError, match="RGB"):
        module.generate({**batch, "references": torch.zeros(1, 1, 4, 32, 32)})
    five = {**batch, "references": torch.zeros(1, 5, 3, 32, 32), "num_references": [5]}
    with pytest.raises(ValueError, match="at most 4"):
        module.generate(five)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        module.flow_loss({**synthetic_batch(size=1), "video": torch.zeros(1, 3, 4, 32, 32)})


def test_mismatched_dimensions_are_reported_at_build():
    wrong_branch = dict(TINY_DIT, branches=[CrossAttentionBranch("text", 48), CrossAttentionBranch("image", 32, "norm_mlp")])
    with pytest.raises(ValueError, match="context_dim=48"):
        tiny_module(dit=partial(WanDiT, **wrong_branch))
    with pytest.raises(ValueError, match="in_channels to 12"):
        tiny_module(dit=partial(WanDiT, **dict(TINY_DIT, in_channels=36)))
    with pytest.raises(ValueError, match="No conditioner feeds"):
        tiny_module(identity=None)
    t2v = dict(TINY_DIT, branches=[CrossAttentionBranch("text", 32)])
    with pytest.raises(ValueError, match="feeds branch 'image'"):
        tiny_module(dit=partial(WanDiT, **t2v))
    with pytest.raises(ValueError, match="at least one conditioner"):
        tiny_module(relational=None, identity=None, multi_reference=None)
    # A text-only model (T5-only, no references) composes fine.
    tiny_module(dit=partial(WanDiT, **dict(t2v, in_channels=4)), identity=None, multi_reference=None,
                relational=RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder)))


def test_foreground_weight_scales_the_loss_where_the_clip_differs_from_its_background():
    """The weighted loss is the plain one on uniform clips and differs once a clip has a subject
    (the weighting itself: test_flow.test_foreground_weights_*)."""
    from encoders import PatchVAE  # lossless: a uniform clip has a uniform latent

    dit = partial(WanDiT, **{**TINY_DIT, "in_channels": 192 + 4 + 192, "out_channels": 192})
    module = tiny_module(foreground_weight=10.0, dit=dit, vae=partial(PatchVAE, spatial=4, temporal=4))

    def loss(weight):
        module.foreground_weight = weight
        return fixed_loss(module, batch)

    batch = synthetic_batch(size=2)
    batch["video"] = torch.full_like(batch["video"], 0.2)  # uniform clips: nothing is foreground
    torch.testing.assert_close(loss(10.0), loss(1.0))
    batch["video"][:, :, :, :8, :8] = -0.6  # a corner subject in every frame
    latents = module.vae.encode(batch["video"])
    weights = foreground_weights(latents, 10.0)
    assert 1 < weights.mean() < 10 and weights.amax() == 10  # some latent pixels are foreground, most not
    # The same draws, now with a subject: the weighted loss is no longer the plain one.
    assert not torch.allclose(loss(10.0), loss(1.0))
    with pytest.raises(ValueError, match="foreground_weight must be > 0"):
        tiny_module(foreground_weight=0.0)


def test_random_frozen_encoders_do_not_depend_on_what_the_trainable_parts_draw(monkeypatch):
    """Lightning builds the model under a GPU init context, where the connector draws from the GPU's
    generator instead of the CPU's; the random (tiny_config) encoders built after it must come out
    the same, or a GPU predict samples with another CLIP tower than training (or its feature
    cache) used."""
    from encoders.base import frozen_encoders
    from tests.pipeline_helpers import cli_module, tiny_model_config

    def encoder_weights():
        module = cli_module(tiny_model_config())
        return {f"{i}.{k}": v for i, e in enumerate(frozen_encoders(module)) for k, v in e.state_dict().items()}

    plain = encoder_weights()
    build_connector = RelationalConditioner._build_connector

    def drawing_more(self, *args):  # what a connector built on another device does to the CPU stream
        build_connector(self, *args)
        torch.randn(1000)

    monkeypatch.setattr(RelationalConditioner, "_build_connector", drawing_more)
    shifted = encoder_weights()
    assert plain.keys() == shifted.keys() and len(plain) > 20
    assert all(torch.equal(plain[k], shifted[k]) for k in plain)


@pytest.mark.parametrize("prediction", ["sample", "velocity"])
def test_sample_loss_space_compares_the_clean_sample(prediction, monkeypatch):
    """``loss_space="sample"``: the loss is MSE(x̂₀, x₀), built here independently: for a DiT that
    predicts x₀ it is its raw output; for a velocity DiT, x_σ − σ·v̂. The velocity loss differs."""
    torch.manual_seed(0)
    module = tiny_module(prediction=prediction, loss_space="sample")
    batch = synthetic_batch(size=2)
    seen = {}
    video_output = module.model.video_output

    def spy(noisy, sigmas, cond):
        out = video_output(noisy, sigmas, cond)
        seen.update(noisy=noisy, sigmas=sigmas, out=out)
        return out

    monkeypatch.setattr(module.model, "video_output", spy)
    generator = torch.Generator().manual_seed(3)
    loss = module.flow_loss(batch, generator=generator)
    x0 = module.vae.encode(batch["video"]).float()
    s = seen["sigmas"].float().view(-1, 1, 1, 1, 1)
    x0_hat = seen["out"].float() if prediction == "sample" else seen["noisy"].float() - s * seen["out"].float()
    torch.testing.assert_close(loss, ((x0_hat - x0) ** 2).mean(), rtol=1e-5, atol=1e-7)
    module.loss_space = "velocity"
    assert not torch.allclose(module.flow_loss(batch, generator=torch.Generator().manual_seed(3)), loss)
