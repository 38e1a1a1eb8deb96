"""One shared contract test run over every Conditioner subclass, plus per-conditioner behaviour."""

import pytest
import torch

import conditioners
from conditioners import Conditioner, Conditioning, IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
from encoders import T5TextEncoder, WanVAE
from tests.helpers import synthetic_batch, valid_tokens
from tests.tiny_parts import tiny, tiny_factory


def concrete_subclasses(cls):
    for sub in cls.__subclasses__():
        if not sub.__module__.startswith("tests"):
            yield sub
        yield from concrete_subclasses(sub)


ALL = sorted(set(concrete_subclasses(Conditioner)), key=lambda c: c.__name__)


def test_every_conditioner_is_exported():
    assert {c.__name__ for c in ALL} <= set(conditioners.__all__)
    assert len(ALL) >= 3


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_conditioner_contract(cls):
    conditioner = tiny(cls)
    vae = tiny(WanVAE)
    conditioner.build(vae)
    conditioner.eval()  # training-only randomness (ReaderConditioner's reference_dropout) off
    spec = conditioner.spec()
    batch = synthetic_batch(size=3)
    out = conditioner(batch)
    assert isinstance(out, Conditioning)
    # What it produces is what its spec says (this is what configure_model checks against the DiT).
    assert {name: t.tokens.shape[-1] for name, t in out.context.items()} == spec.branches
    for tokens in out.context.values():
        assert tokens.tokens.shape[:2] == tokens.mask.shape and tokens.mask.dtype == torch.bool
        assert tokens.tokens.shape[0] == 3
    if spec.slot_channels:
        assert out.slots.shape[:3] == (3, spec.slot_channels, batch["references"].shape[1])
    else:
        assert out.slots is None
    # Deterministic, and the null condition keeps the layout (needed for batched CFG).
    again = conditioner(batch)
    for name in out.context:
        torch.testing.assert_close(out.context[name].tokens, again.context[name].tokens)
    null = conditioner(batch, drop=[True, False, True])
    assert set(null.context) == set(out.context)
    assert (null.slots is None) == (out.slots is None)
    # Only trainable parts have gradients (new projections, trainable readers); encoders stay frozen.
    for name, p in conditioner.named_parameters():
        if p.requires_grad:
            assert "connector" in name or name.startswith("reader."), f"{cls.__name__}.{name} is trainable but is not a new projection"


def test_relational_concatenates_connector_tokens_before_t5():
    c = tiny(RelationalConditioner)
    c.build(tiny(WanVAE))
    batch = synthetic_batch(size=2)
    out = c(batch).context["text"]
    t5 = c.text_encoder(batch["prompt"])
    counts = batch["num_references"]
    mask = torch.tensor([[i < n for i in range(2)] for n in counts])
    mllm = c.mllm(batch["prompt"], batch["references"], mask)
    assert out.tokens.shape[1] == mllm.tokens.shape[1] + t5.tokens.shape[1]
    torch.testing.assert_close(out.tokens[:, -t5.tokens.shape[1]:], t5.tokens)
    # Zero-init connector: the MLLM tokens carry no information at step 0.
    assert out.tokens[:, : mllm.tokens.shape[1]].abs().max() == 0
    assert c.connector[0].weight.requires_grad


def test_a_dropped_relational_condition_is_the_empty_prompt_read_without_images():
    """Condition dropout replaces exactly the dropped rows by the documented null condition (the
    empty ``null_prompt`` read without images: ``[connector(MLLM("")) ; T5("")]``), built here from the
    encoders themselves; the other rows keep their own condition."""
    c = tiny(RelationalConditioner)
    c.build(tiny(WanVAE))
    torch.nn.init.normal_(c.connector[2].weight, std=0.5)  # MLLM tokens that carry information
    batch = synthetic_batch(size=3)
    with torch.no_grad():
        t5, mllm = c.text_encoder([""]), c.mllm([""], None, None)
        null = torch.cat([c.connector(mllm.tokens), t5.tokens], 1)[0][torch.cat([mllm.mask, t5.mask], 1)[0]]
    kept = c(batch).context["text"]
    drop = [True, False, True]
    dropped = c(batch, drop=drop).context["text"]
    for i, is_dropped in enumerate(drop):
        expected = null if is_dropped else valid_tokens(kept, i)
        assert valid_tokens(dropped, i).shape == expected.shape, (i, is_dropped)
        torch.testing.assert_close(valid_tokens(dropped, i), expected, msg=f"row {i} (dropped: {is_dropped})")
    for i in range(3):  # the null condition is not what any prompt of the batch gives
        assert valid_tokens(kept, i).shape != null.shape or not torch.allclose(valid_tokens(kept, i), null)


def test_t5_only_conditioner_trains_from_a_cache_made_with_an_mllm():
    full = tiny(RelationalConditioner)
    full.build(tiny(WanVAE))
    batch = synthetic_batch(size=2)
    features, state = full.encode(batch), full.cached_state()
    t5_only = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=None)
    t5_only.build_cached(None, state)  # the MLLM features and null rows are ignored
    assert t5_only.connector is None and not any("mllm" in k for k in t5_only._null())
    torch.testing.assert_close(t5_only.condition(batch, features).context["text"].tokens, features["t5_tokens"])
    no_mllm_state = {k: v for k, v in state.items() if "mllm" not in k}
    with pytest.raises(ValueError, match="made without an MLLM but this RelationalConditioner has one"):
        tiny(RelationalConditioner).build_cached(None, no_mllm_state)


def test_relational_without_mllm_is_the_t5_only_ablation():
    c = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=None)
    c.build(tiny(WanVAE))
    batch = synthetic_batch(size=2)
    torch.testing.assert_close(c(batch).context["text"].tokens, c.text_encoder(batch["prompt"]).tokens)
    assert c.connector is None


def test_identity_masks_padded_and_dropped_references():
    c = tiny(IdentityConditioner)
    c.build(tiny(WanVAE))
    batch = synthetic_batch(size=2)
    one, two = batch["num_references"].index(1), batch["num_references"].index(2)
    out = c(batch).context["image"]
    per_ref = c.image_encoder.num_tokens
    assert out.tokens.shape[1] == 2 * per_ref
    assert out.mask[one].tolist() == [True] * per_ref + [False] * per_ref
    assert out.mask[two].all()
    drop = [i == two for i in range(2)]
    assert not c(batch, drop=drop).context["image"].mask[two].any()


def test_multi_reference_slots_hold_latents_and_masks():
    vae = tiny(WanVAE)
    c = tiny(MultiReferenceConditioner)
    c.build(vae)
    batch = synthetic_batch(size=2)
    one, two = batch["num_references"].index(1), batch["num_references"].index(2)
    out = c(batch)
    z = vae.latent_channels
    expected = vae.encode_images(batch["references"][two])[:, :, 0]  # (2, z, h, w)
    torch.testing.assert_close(out.slots[two, 4:].transpose(0, 1), expected)
    assert (out.slots[:, 0, :][out.slot_mask] == 1).all()  # mask channel 0 on in real slots
    assert out.slots[:, 1:4].abs().max() == 0  # the other mask channels stay 0
    assert out.slots[one, :, 1].abs().max() == 0  # padding slot is empty
    assert out.slot_mask[one].tolist() == [True, False] and out.slot_mask[two].all()
    assert out.slots.shape[1] == 4 + z
    dropped = c(batch, drop=[i == one for i in range(2)])
    assert dropped.slots[one].abs().max() == 0 and dropped.slots[two].abs().max() > 0


def test_multi_reference_crop_puts_each_subject_at_one_size_in_the_centre():
    """crop_size: a subject anywhere and at any scale in its reference reaches the slot as a
    crop_size square in the canvas's centre (the lossless PatchVAE shows the pixels exactly)."""
    from encoders import PatchVAE

    vae = PatchVAE(spatial=4, temporal=1, scale=1.0, shift=0.0)
    c = MultiReferenceConditioner(max_references=2, crop_size=8)
    c.build(vae)
    references = torch.ones(1, 2, 3, 32, 32)  # white
    references[0, 0, :, 3:19, 10:26] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # a red 16 px square, off-centre
    references[0, 1, :, 20:24, 2:6] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]  # a blue 4 px one in a corner
    out = c({"references": references, "num_references": [2]})
    slots = vae.decode(out.slots[:, 4:])[0]  # (3, 2, 32, 32): the slot images again
    for i, colour in enumerate(([1.0, -1.0, -1.0], [-1.0, -1.0, 1.0])):
        expected = torch.ones(3, 32, 32)
        expected[:, 12:20, 12:20] = torch.tensor(colour)[:, None, None]
        ring = torch.zeros(32, 32, dtype=torch.bool)
        ring[12:20, 12:20] = True
        ring[13:19, 13:19] = False  # the square's outer pixels mix with white (bilinear sampling at the box edge)
        torch.testing.assert_close(slots[:, i][:, ~ring], expected[:, ~ring], atol=1e-5, rtol=0)
        mixed = (slots[:, i][:, ring] - 1) / (expected[:, ring] - 1 - 1e-9)  # 0: white .. 1: the colour
        assert mixed[expected[:, ring] < 1].min() >= 0.4 and mixed[expected[:, ring] < 1].max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="crop_size"):
        MultiReferenceConditioner(crop_size=0)


def test_multi_reference_rejects_too_many_references():
    c = MultiReferenceConditioner(max_references=1)
    c.build(tiny(WanVAE))
    with pytest.raises(ValueError, match="at most 1"):
        c(synthetic_batch(size=2))


def test_relational_connector_from_the_released_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from encoders import MLLMEncoder
    from bindweave.weights.loading import WeightsError

    reference = tiny(RelationalConditioner)
    reference.build(tiny(WanVAE))
    width, hidden = reference.text_encoder.hidden_size, reference.mllm.hidden_size
    weights = {
        "condition_embedder.text_projector.linear_1.weight": torch.randn(width, hidden),
        "condition_embedder.text_projector.linear_1.bias": torch.randn(width),
        "condition_embedder.text_projector.linear_2.weight": torch.randn(width, width),
        "condition_embedder.text_projector.linear_2.bias": torch.randn(width),
        "blocks.0.attn1.to_q.weight": torch.zeros(2, 2),  # the rest of the DiT, ignored here
    }
    save_file(weights, tmp_path / "release.safetensors")
    c = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=tiny_factory(MLLMEncoder),
                              release_connector_path=str(tmp_path / "release.safetensors"))
    c.build(tiny(WanVAE))
    torch.testing.assert_close(c.connector[0].weight, weights["condition_embedder.text_projector.linear_1.weight"])
    torch.testing.assert_close(c.connector[2].bias, weights["condition_embedder.text_projector.linear_2.bias"])
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    wrong = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=tiny_factory(MLLMEncoder),
                                  release_connector_path=str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="text_projector"):
        wrong.build(tiny(WanVAE))
    with pytest.raises(ValueError, match="needs an `mllm`"):
        RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), release_connector_path="x")


def test_reference_mask_and_drops_are_built_from_the_host_lists():
    from conditioners.references import apply_drop, reference_mask

    batch = {"references": torch.zeros(3, 4, 3, 8, 8), "num_references": [1, 4, 0]}
    mask = reference_mask(batch)
    assert mask.tolist() == [[True, False, False, False], [True] * 4, [False] * 4]
    assert apply_drop(mask, [False, True, False]).tolist() == [[True, False, False, False], [False] * 4, [False] * 4]
    assert apply_drop(mask, None) is mask and apply_drop(mask, [False] * 3) is mask
    masks = torch.ones(3, 2, 5, dtype=torch.bool)  # (B, ...) of any rank
    assert apply_drop(masks, [True, False, True]).sum(dim=(1, 2)).tolist() == [0, 10, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_of_the_sprites_reader_never_waits_for_the_gpu():
    """Issue #21: the host must queue step N+1 while the GPU runs step N; a device-to-host sync in
    the step (a pageable host->device copy, .item(), a bool of a CUDA tensor) stops that."""
    import lightning as L

    from bindweave.cli.app import BindWeaveArgumentParser, BindWeaveCLI
    from bindweave.training.module import BindWeave

    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False,
                       parser_class=BindWeaveArgumentParser,
                       args=["-c", "configs/sprites-reader.yaml", "--data.init_args.batch_size", "8",
                             "--data.init_args.num_workers", "0", "--model.dit.init_args.num_layers", "1"])
    module, data = cli.model, cli.datamodule
    module.configure_model()
    module.cuda().train()
    host = next(iter(data.train_dataloader()))
    moved = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else
             ({kk: vv.cuda(non_blocking=True) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in host.items()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)
    for step in range(3):
        batch = data.on_after_batch_transfer(dict(moved), 0)
        drops = module.training_drops(len(batch["prompt"]))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")  # the first step may set things up
        try:
            with torch.autocast("cuda", torch.bfloat16):
                loss = module.flow_loss(batch, drops)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
