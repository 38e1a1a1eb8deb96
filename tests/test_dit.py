"""WanDiT: shapes, gradients, branch summation, masking, presets and diffusers parity."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from bindweave.model.attention import attention
from bindweave.weights.diffusers_format import (
    bindweave_config_for,
    bindweave_to_diffusers,
    diffusers_config_for,
    diffusers_to_bindweave,
)
from bindweave.model.dit import (
    CrossAttentionBranch,
    WanDiT,
    absolute_position_table,
    rope_axis_dims,
    timestep_sinusoid,
)
from bindweave.model.presets import PRESETS, wan_dit_preset

TEXT, IMAGE = CrossAttentionBranch("text", 32), CrossAttentionBranch("image", 24, "norm_mlp")


def tiny_dit(image: bool = True, **kw) -> WanDiT:
    args = dict(in_channels=36 if image else 16, out_channels=16, dim=48, ffn_dim=64, num_heads=4, num_layers=2,
                branches=[TEXT, IMAGE] if image else [TEXT], freq_dim=32)
    dit = WanDiT(**{**args, **kw})
    for p in dit.parameters():  # random everywhere, including the zero-initialised head
        torch.nn.init.normal_(p, std=0.1)
    return dit


def inputs(dit: WanDiT, batch=2, frames=3, h=8, w=12, text_len=7, image_len=9):
    x = torch.randn(batch, dit.in_channels, frames, h, w)
    t = torch.tensor([10.0, 700.0][:batch])
    ctx = {"text": torch.randn(batch, text_len, 32)}
    if "image" in dit.branches:
        ctx["image"] = torch.randn(batch, image_len, 24)
    return x, t, ctx


def test_shapes_and_gradients():
    dit = tiny_dit()
    x, t, ctx = inputs(dit)
    out = dit(x, t, ctx)
    assert out.shape == (2, 16, 3, 8, 12)
    out.square().mean().backward()
    for name, p in dit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_fresh_model_predicts_zero_and_head_is_zero_init():
    dit = WanDiT(in_channels=16, dim=48, ffn_dim=64, num_heads=4, num_layers=1, branches=[TEXT], freq_dim=32)
    x, t, ctx = inputs(dit)
    assert dit(x, t, ctx).abs().max() == 0


def test_absolute_position_adds_a_fixed_table_and_no_parameters():
    torch.manual_seed(0)
    plain = tiny_dit()
    positioned = tiny_dit(absolute_position=True)
    positioned.load_state_dict(plain.state_dict())  # same keys: the table is not a parameter
    x, t, ctx = inputs(plain)
    grid = (3, 4, 6)
    difference = positioned.embed(x, t, ctx).tokens - plain.embed(x, t, ctx).tokens  # (B, L, D)
    table = absolute_position_table(grid, 48, torch.device("cpu"))
    torch.testing.assert_close(difference, table.expand_as(difference))
    assert len({tuple(row.tolist()) for row in table}) == 3 * 4 * 6  # every token gets its own position
    # the (t, h, w) parts of a token's features depend on its own coordinate only
    view = table.view(*grid, 48)
    t_dim, h_dim, _ = rope_axis_dims(48)
    torch.testing.assert_close(view[:, 0, 0, :t_dim], view[:, 3, 5, :t_dim])
    torch.testing.assert_close(view[0, :, 2, t_dim:t_dim + h_dim], view[2, :, 0, t_dim:t_dim + h_dim])
    assert not torch.allclose(positioned(x, t, ctx), plain(x, t, ctx))


def test_branch_position_tells_equal_tokens_apart():
    torch.manual_seed(0)
    plain = tiny_dit()
    positioned = tiny_dit(branches=[CrossAttentionBranch("text", 32, position=True), IMAGE])
    positioned.load_state_dict(plain.state_dict())  # no new parameters
    token = torch.randn(1, 1, 32)
    context = {"text": token.expand(1, 5, 32), "image": torch.randn(1, 3, 24)}  # one token, five times
    same = plain.embed_context(context)["text"][0]  # (5, D)
    told_apart = positioned.embed_context(context)["text"][0]
    assert torch.allclose(same, same[:1].expand_as(same))  # without positions: indistinguishable keys
    torch.testing.assert_close(told_apart - same, timestep_sinusoid(torch.arange(5), 48))
    assert len({tuple(row.round(decimals=4).tolist()) for row in told_apart}) == 5
    torch.testing.assert_close(positioned.embed_context(context)["image"], plain.embed_context(context)["image"])
    # Padding inside the sequence (two conditioners' parts, each padded to its batch's longest) does
    # not move the real tokens' positions: they count real tokens only.
    parts = torch.randn(1, 5, 32)
    padded = {"text": torch.cat([parts[:, :2], torch.randn(1, 3, 32), parts[:, 2:]], dim=1), "image": context["image"]}
    mask = {"text": torch.tensor([[True, True, False, False, False, True, True, True]]), "image": None}
    real = positioned.embed_context(padded, mask)["text"][0][mask["text"][0]]  # (5, D)
    torch.testing.assert_close(real, positioned.embed_context({**context, "text": parts})["text"][0])


def test_branch_refiner_mixes_real_tokens_ignores_padding_and_starts_as_identity():
    torch.manual_seed(0)
    plain = tiny_dit(branches=[CrossAttentionBranch("text", 32, position=True), IMAGE])
    refined = tiny_dit(branches=[CrossAttentionBranch("text", 32, position=True, refiner_layers=2), IMAGE])
    assert not any(k.startswith("context_refiners") for k in plain.state_dict())  # Wan's keys unchanged
    refined.initialize_weights()  # (tiny_dit randomises every parameter) then all but the refiner from `plain`
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("context_refiners.text.") for k in missing)
    context = {"text": torch.randn(2, 5, 32), "image": torch.randn(2, 3, 24)}
    mask = {"text": torch.ones(2, 5, dtype=torch.bool), "image": None}
    torch.testing.assert_close(refined.embed_context(context, mask), plain.embed_context(context, mask))  # zero-init

    with torch.no_grad():
        for p in refined.context_refiners.parameters():
            p.normal_(0, 0.2)
    out = refined.embed_context(context, mask)["text"]  # (2, 5, D)
    changed = {**context, "text": context["text"].clone()}
    changed["text"][:, 4] += 1.0  # another token of the prompt changes ...
    assert not torch.allclose(refined.embed_context(changed, mask)["text"][:, :4], out[:, :4])  # ... so do the others
    padded = {**context, "text": torch.cat([context["text"], torch.randn(2, 3, 32)], dim=1)}  # junk padding
    padded_mask = {"text": torch.cat([mask["text"], torch.zeros(2, 3, dtype=torch.bool)], dim=1), "image": None}
    torch.testing.assert_close(refined.embed_context(padded, padded_mask)["text"][:, :5], out)
    with pytest.raises(ValueError, match="refiner_layers must be >= 0"):
        tiny_dit(branches=[CrossAttentionBranch("text", 32, refiner_layers=-1), IMAGE])


def _cross_attention_with(block, q_in, context, mask, only):
    """One branch's contribution to a block's cross-attention, computed by hand."""
    ca = block.cross_attn
    q = ca.norm_q(ca.to_q(q_in)).unflatten(-1, (ca.num_heads, -1))
    kv = ca.branches[only]
    k = kv.norm_k(kv.to_k(context)).unflatten(-1, (ca.num_heads, -1))
    v = kv.to_v(context).unflatten(-1, (ca.num_heads, -1))
    return attention(q, k, v, mask).flatten(2)


def test_cross_attention_sums_branches():
    dit = tiny_dit()
    block = dit.blocks[0]
    h = torch.randn(2, 10, 48)
    ctx = {"text": torch.randn(2, 5, 48), "image": torch.randn(2, 6, 48)}
    together = block.cross_attn(h, ctx, {})
    separate = sum(_cross_attention_with(block, h, ctx[n], None, n) for n in ("text", "image"))
    torch.testing.assert_close(together, block.cross_attn.to_out(separate))


def test_padded_context_tokens_are_masked():
    dit = tiny_dit(image=False)
    x, t, ctx = inputs(dit, text_len=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    padded = torch.cat([ctx["text"], torch.randn(2, 4, 32)], dim=1)  # garbage padding
    pad_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(dit(x, t, ctx), dit(x, t, {"text": padded}, {"text": pad_mask}))
    assert not torch.allclose(dit(x, t, ctx), dit(x, t, {"text": padded}))


def test_fully_masked_branch_contributes_nothing():
    dit = tiny_dit()
    x, t, ctx = inputs(dit)
    no_image = {"text": None, "image": torch.zeros(2, 9, dtype=torch.bool)}
    out = dit(x, t, ctx, no_image)
    assert torch.isfinite(out).all()
    # Same as a model whose image branch is removed.
    text_only = WanDiT(in_channels=36, out_channels=16, dim=48, ffn_dim=64, num_heads=4, num_layers=2, branches=[TEXT], freq_dim=32)
    text_only.load_state_dict(dit.state_dict(), strict=False)
    torch.testing.assert_close(out, text_only(x, t, {"text": ctx["text"]}))


def test_frame_mask_hides_padding_frames():
    dit = tiny_dit()
    x, t, ctx = inputs(dit, frames=4)
    frame_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out = dit(x, t, ctx, frame_mask=frame_mask)
    x2 = x.clone()
    x2[0, :, 3] = torch.randn_like(x2[0, :, 3])  # change only the padding frame of sample 0
    out2 = dit(x2, t, ctx, frame_mask=frame_mask)
    torch.testing.assert_close(out[0, :, :3], out2[0, :, :3])


def test_embedded_context_reuse_matches():
    dit = tiny_dit()
    x, t, ctx = inputs(dit)
    torch.testing.assert_close(dit(x, t, ctx), dit(x, t, dit.embed_context(ctx), context_embedded=True))


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_parity_with_diffusers_both_directions(image):
    dit = tiny_dit(image=image).eval()
    reference = WanTransformer3DModel(**diffusers_config_for(dit)).eval()
    reference.load_state_dict(bindweave_to_diffusers(dit.state_dict()), strict=True)
    # diffusers' I2V processor assumes exactly 512 text tokens: feed exactly 512.
    x, t, ctx = inputs(dit, text_len=512, image_len=257)
    ours = dit(x, t, ctx)
    theirs = reference(x, t, ctx["text"], encoder_hidden_states_image=ctx.get("image"), return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # And back: a diffusers model converted to ours.
    fresh = WanDiT(**bindweave_config_for(dict(reference.config)))
    fresh.load_state_dict(diffusers_to_bindweave(reference.state_dict()), strict=True)
    torch.testing.assert_close(fresh(x, t, ctx), theirs, rtol=1e-4, atol=1e-4)


def test_conversion_rejects_foreign_keys():
    with pytest.raises(ValueError, match="no known mapping"):
        diffusers_to_bindweave({"unet.conv_in.weight": torch.zeros(1)})


def test_presets_match_released_sizes():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in wan_dit_preset(name).parameters())
    assert 1.2e9 < counts["wan2.1-t2v-1.3b"] < 1.5e9
    assert 13.5e9 < counts["wan2.1-t2v-14b"] < 14.5e9
    assert counts["wan2.1-i2v-14b"] > counts["wan2.1-t2v-14b"]


def test_bad_inputs_raise_helpful_errors():
    dit = tiny_dit()
    x, t, ctx = inputs(dit)
    with pytest.raises(ValueError, match="36"):
        dit(x[:, :16], t, ctx)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        dit(x[..., :7, :], t, ctx)
    with pytest.raises(ValueError, match="branches"):
        dit(x, t, {"text": ctx["text"]})
    with pytest.raises(ValueError, match="context_dim"):
        dit(x, t, {"text": ctx["text"], "image": torch.randn(2, 9, 25)})
    with pytest.raises(ValueError, match="unique"):
        WanDiT(branches=[TEXT, TEXT])


def test_t2v_weights_in_bindweave_dit_are_unchanged_at_step_0(tmp_path):
    """Wan T2V (16 channels, text only) loaded into the 36-channel text+image BindWeave DiT: the new
    input channels and the new image branch are zero-initialised, so the output is the T2V output
    whatever the reference channels and image tokens hold."""
    from safetensors.torch import save_file

    from bindweave.weights.dit_loading import load_dit

    t2v = tiny_dit(image=False).eval()
    bindweave = tiny_dit(image=True).eval()
    save_file(t2v.state_dict(), tmp_path / "t2v.safetensors")
    fresh = load_dit(bindweave, tmp_path / "t2v.safetensors", allow_new_conditions=True).fresh
    assert any(k.startswith("patch_embedding.weight") for k in fresh) and any(".branches.image.to_v." in k for k in fresh)
    x, t, ctx = inputs(bindweave)
    expected = t2v(x[:, :16], t, {"text": ctx["text"]})
    torch.testing.assert_close(bindweave(x, t, ctx), expected)


def test_allow_new_conditions_still_names_wrong_shapes(tmp_path):
    from safetensors.torch import save_file

    from bindweave.weights.dit_loading import load_dit

    small = tiny_dit(image=False)
    wide = tiny_dit(image=True, dim=64, num_heads=4)
    save_file(small.state_dict(), tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"patch_embedding.weight has shape \(48"):
        load_dit(wide, tmp_path / "small.safetensors", allow_new_conditions=True)
