"""The official Wan2.1 checkpoint layouts (github.com/Wan-Video/Wan2.1, ``wan/modules``) mapped to ours.

Four files of an official Wan2.1 download and where they go:

=========================================================  ======================================================
official file / module                                     this project
=========================================================  ======================================================
``diffusion_pytorch_model*.safetensors`` (``WanModel``)    :class:`~bindweave.model.dit.WanDiT` (pure renaming)
``models_t5_umt5-xxl-enc-bf16.pth`` (``T5Encoder``)        transformers ``UMT5EncoderModel`` (pure renaming)
``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``  open_clip ``VisionTransformer`` (``visual.*`` only;
(``XLMRobertaCLIP``)                                       class/position embeddings reshaped, text tower dropped)
``Wan2.1_VAE.pth`` (``WanVAE_``)                           diffusers ``AutoencoderKLWan`` (pure renaming)
=========================================================  ======================================================

Every mapping works in both directions and on keys alone where it can (so a 14B DiT is renamed
without reading it). Architectures are read from the tensor shapes (T5, CLIP, VAE) or from the
``config.json`` of the official DiT folder. Parity against the official code is tested with outputs
it produced on tiny random models (``tests/fixtures/wan_official/``).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from bindweave.model.dit import CrossAttentionBranch, WanDiT

# ----------------------------------------------------------------------------------------------
# DiT: WanModel <-> WanDiT
# ----------------------------------------------------------------------------------------------

# (our key prefix, official key prefix); {text}/{image} are branch names, block keys follow "blocks.{i}.".
_DIT_TOP = [
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "time_embedding.0."),
    ("time_embedding.2.", "time_embedding.2."),
    ("time_modulation.1.", "time_projection.1."),
    ("context_embedders.{text}.net.0.", "text_embedding.0."),
    ("context_embedders.{text}.net.2.", "text_embedding.2."),
    ("context_embedders.{image}.net.0.", "img_emb.proj.0."),
    ("context_embedders.{image}.net.1.", "img_emb.proj.1."),
    ("context_embedders.{image}.net.3.", "img_emb.proj.3."),
    ("context_embedders.{image}.net.4.", "img_emb.proj.4."),
    ("head.proj.", "head.head."),
    ("head.modulation", "head.modulation"),
]
_DIT_BLOCK = [
    ("modulation", "modulation"),
    ("self_attn.to_q.", "self_attn.q."),
    ("self_attn.to_k.", "self_attn.k."),
    ("self_attn.to_v.", "self_attn.v."),
    ("self_attn.to_out.", "self_attn.o."),
    ("self_attn.norm_q.", "self_attn.norm_q."),
    ("self_attn.norm_k.", "self_attn.norm_k."),
    ("norm_cross.", "norm3."),
    ("cross_attn.to_q.", "cross_attn.q."),
    ("cross_attn.norm_q.", "cross_attn.norm_q."),
    ("cross_attn.to_out.", "cross_attn.o."),
    ("cross_attn.branches.{text}.to_k.", "cross_attn.k."),
    ("cross_attn.branches.{text}.to_v.", "cross_attn.v."),
    ("cross_attn.branches.{text}.norm_k.", "cross_attn.norm_k."),
    ("cross_attn.branches.{image}.to_k.", "cross_attn.k_img."),
    ("cross_attn.branches.{image}.to_v.", "cross_attn.v_img."),
    ("cross_attn.branches.{image}.norm_k.", "cross_attn.norm_k_img."),
    ("ffn.0.", "ffn.0."),
    ("ffn.2.", "ffn.2."),
]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
# Prefix of the ComfyUI repackaged single files; stripped like diffusers' single-file loader does.
COMFY_PREFIX = "model.diffusion_model."
UNSUPPORTED_DIT_KEYS = {
    "img_emb.emb_pos": "FLF2V (first-last-frame) models are not supported",
    "vace_blocks.": "VACE models are not supported",
}


def _dit_table(text: str, image: str, to_wan: bool) -> tuple[list, list]:
    top = [(o.format(text=text, image=image), w) for o, w in _DIT_TOP]
    block = [(o.format(text=text, image=image), w) for o, w in _DIT_BLOCK]
    if not to_wan:
        top, block = [(w, o) for o, w in top], [(w, o) for o, w in block]
    return top, block


def _rename_dit_key(key: str, top: list, block: list) -> str | None:
    match = _BLOCK.match(key)
    table, rest, lead = (block, match.group(2), f"blocks.{match.group(1)}.") if match else (top, key, "")
    for src, dst in table:
        if rest.startswith(src):
            return lead + dst + rest[len(src):]
    return None


def wan_to_bindweave_key(key: str, text_branch: str = "text", image_branch: str = "image") -> str | None:
    """Our :class:`WanDiT` key for an official ``WanModel`` key (None if it has no counterpart)."""
    key = key.removeprefix(COMFY_PREFIX)
    return _rename_dit_key(key, *_dit_table(text_branch, image_branch, to_wan=False))


def bindweave_to_wan_key(key: str, text_branch: str = "text", image_branch: str = "image") -> str | None:
    """The official ``WanModel`` key for one of our :class:`WanDiT` keys (None if it has none)."""
    return _rename_dit_key(key, *_dit_table(text_branch, image_branch, to_wan=True))


def _rename_all(state_dict: dict, rename: Callable[[str], str | None], what: str) -> dict:
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} {what} keys have no known mapping, e.g. {unknown[:5]}.")
    return out


def bindweave_to_wan(state_dict: dict, text_branch: str = "text", image_branch: str = "image") -> dict:
    """Rename a :class:`WanDiT` state dict to official ``WanModel`` keys (tensors untouched)."""
    return _rename_all(state_dict, lambda k: bindweave_to_wan_key(k, text_branch, image_branch), "WanDiT")


def wan_dit_arguments(config: dict) -> dict:
    """:class:`WanDiT` arguments for an official ``WanModel`` ``config.json``.

    Wan hard-codes the image embedder's input to 1280 (CLIP ViT-H) and the patch to (1, 2, 2) unless
    the config says otherwise.
    """
    model_type = config.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v"):
        raise ValueError(f"Official Wan model_type {model_type!r} is not supported (t2v and i2v are).")
    branches = [CrossAttentionBranch("text", config.get("text_dim", 4096), "mlp")]
    if model_type == "i2v":
        branches.append(CrossAttentionBranch("image", 1280, "norm_mlp"))
    return dict(
        in_channels=config.get("in_dim", 16),
        out_channels=config.get("out_dim", 16),
        dim=config.get("dim", 2048),
        ffn_dim=config.get("ffn_dim", 8192),
        num_heads=config.get("num_heads", 16),
        num_layers=config.get("num_layers", 32),
        branches=branches,
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        freq_dim=config.get("freq_dim", 256),
        eps=config.get("eps", 1e-6),
    )


def wan_config_for(dit: WanDiT, text_branch: str = "text", image_branch: str = "image") -> dict:
    """The official ``config.json`` (``WanModel``) of a :class:`WanDiT` with Wan's architecture."""
    extra = set(dit.branches) - {text_branch, image_branch}
    if text_branch not in dit.branches or extra:
        raise ValueError(f"Wan has a text and optionally an image branch; this DiT has {sorted(dit.branches)}.")
    dit.check_wan_compatible("the official Wan layout")
    return {
        "_class_name": "WanModel",
        "model_type": "i2v" if image_branch in dit.branches else "t2v",
        "patch_size": list(dit.patch_size),
        "text_len": 512,
        "in_dim": dit.in_channels,
        "dim": dit.dim,
        "ffn_dim": dit.blocks[0].ffn[0].out_features,
        "freq_dim": dit.freq_dim,
        "text_dim": dit.branches[text_branch].context_dim,
        "out_dim": dit.out_channels,
        "num_heads": dit.num_heads,
        "num_layers": len(dit.blocks),
        "eps": dit.blocks[0].norm_self.eps,
    }


# ----------------------------------------------------------------------------------------------
# T5: Wan's T5Encoder (models_t5_umt5-xxl-enc-bf16.pth) <-> transformers UMT5EncoderModel
# ----------------------------------------------------------------------------------------------

_T5_BLOCK = [
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),  # GELU-tanh gate
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
]
_T5_TOP = [("token_embedding.weight", "shared.weight"), ("norm.weight", "encoder.final_layer_norm.weight")]
_T5_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_T5_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.*)$")


def wan_t5_to_transformers_key(key: str) -> str | None:
    """transformers ``UMT5EncoderModel`` key of a Wan ``T5Encoder`` key (None if unknown)."""
    match = _T5_WAN_BLOCK.match(key)
    if match:
        for wan, hf in _T5_BLOCK:
            if match.group(2) == wan:
                return f"encoder.block.{match.group(1)}.{hf}"
        return None
    return dict(_T5_TOP).get(key)


def transformers_t5_to_wan_key(key: str) -> str | None:
    """Wan ``T5Encoder`` key of a transformers ``UMT5EncoderModel`` key (None if unknown or tied)."""
    match = _T5_HF_BLOCK.match(key)
    if match:
        for wan, hf in _T5_BLOCK:
            if match.group(2) == hf:
                return f"blocks.{match.group(1)}.{wan}"
        return None
    return {hf: wan for wan, hf in _T5_TOP}.get(key)


def transformers_t5_to_wan(state_dict: dict) -> dict:
    """A ``UMT5EncoderModel`` state dict in Wan's ``T5Encoder`` keys (``encoder.embed_tokens`` is
    the tied ``shared`` embedding and is dropped)."""
    state_dict = {k: v for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"}
    return _rename_all(state_dict, transformers_t5_to_wan_key, "UMT5")


def umt5_config_from_wan(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``UMT5Config`` kwargs of a Wan ``T5Encoder`` checkpoint, read from its tensor shapes.

    The relative attention max distance (128) and the gated-GELU feed-forward are fixed in Wan's code.
    """
    layers = sorted({int(m.group(1)) for k in shapes if (m := _T5_WAN_BLOCK.match(k))})
    if "token_embedding.weight" not in shapes or not layers:
        raise ValueError("Not a Wan T5 encoder checkpoint: no token_embedding.weight / blocks.* keys.")
    vocab, d_model = shapes["token_embedding.weight"]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    inner = shapes["blocks.0.attn.q.weight"][0]
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        num_layers=len(layers),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


# ----------------------------------------------------------------------------------------------
# CLIP: Wan's XLMRobertaCLIP.visual <-> open_clip VisionTransformer
# ----------------------------------------------------------------------------------------------

_CLIP_TOP = [
    ("visual.patch_embedding.weight", "conv1.weight"),
    ("visual.pre_norm.", "ln_pre."),
    ("visual.post_norm.", "ln_post."),
]
_CLIP_BLOCK = [
    ("norm1.", "ln_1."),
    ("attn.to_qkv.weight", "attn.in_proj_weight"),  # both [q; k; v] along the output dim
    ("attn.to_qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."),
    ("norm2.", "ln_2."),
    ("mlp.0.", "mlp.c_fc."),
    ("mlp.2.", "mlp.c_proj."),
]
_CLIP_WAN_BLOCK = re.compile(r"^visual\.transformer\.(\d+)\.(.*)$")
_CLIP_OC_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")


def is_wan_clip(keys) -> bool:
    """Whether these keys are Wan's ``XLMRobertaCLIP`` layout (``visual.cls_embedding`` ...)."""
    return "visual.cls_embedding" in keys and "visual.pos_embedding" in keys


def open_clip_to_wan_clip_key(key: str) -> str | None:
    """Wan ``XLMRobertaCLIP`` key of an open_clip ``VisionTransformer`` key (None if it has none).

    ``class_embedding`` (D) is Wan's ``visual.cls_embedding`` (1, 1, D), ``positional_embedding``
    (T, D) is ``visual.pos_embedding`` (1, T, D) and ``proj`` is ``visual.head``: same values, other
    leading dimensions.
    """
    fixed = {"class_embedding": "visual.cls_embedding", "positional_embedding": "visual.pos_embedding",
             "proj": "visual.head"}
    if key in fixed:
        return fixed[key]
    if match := _CLIP_OC_BLOCK.match(key):
        for wan, oc in _CLIP_BLOCK:
            if match.group(2).startswith(oc):
                return f"visual.transformer.{match.group(1)}.{wan}{match.group(2)[len(oc):]}"
        return None
    for wan, oc in _CLIP_TOP:
        if key.startswith(oc):
            return wan + key[len(oc):]
    return None


def wan_clip_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower of a Wan CLIP state dict in open_clip ``VisionTransformer`` keys and shapes
    (the text tower ``textual.*`` and ``log_scale`` are dropped)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if not key.startswith("visual."):
            continue
        target = _wan_clip_target(key)
        if target is None:
            unknown.append(key)
            continue
        if target == "class_embedding":
            value = value.reshape(-1)
        elif target == "positional_embedding":
            value = value.reshape(value.shape[-2:])
        out[target] = value
    if unknown:
        raise ValueError(f"{len(unknown)} Wan CLIP keys have no open_clip counterpart, e.g. {unknown[:5]}.")
    return out


def _wan_clip_target(key: str) -> str | None:
    fixed = {"visual.cls_embedding": "class_embedding", "visual.pos_embedding": "positional_embedding",
             "visual.head": "proj"}
    if key in fixed:
        return fixed[key]
    if match := _CLIP_WAN_BLOCK.match(key):
        for wan, oc in _CLIP_BLOCK:
            if match.group(2).startswith(wan):
                return f"transformer.resblocks.{match.group(1)}.{oc}{match.group(2)[len(wan):]}"
        return None
    for wan, oc in _CLIP_TOP:
        if key.startswith(wan):
            return oc + key[len(wan):]
    return None


def open_clip_to_wan_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ``VisionTransformer`` state dict in Wan's ``visual.*`` keys and shapes (inverse of
    :func:`wan_clip_to_open_clip`; the text tower is not produced)."""
    out = {}
    for key, value in state_dict.items():
        target = open_clip_to_wan_clip_key(key)
        if target is None:
            raise ValueError(f"open_clip key {key!r} has no Wan counterpart.")
        if key == "class_embedding":
            value = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            value = value.unsqueeze(0)
        out[target] = value
    return out


# ----------------------------------------------------------------------------------------------
# VAE: Wan's WanVAE_ (Wan2.1_VAE.pth) <-> diffusers AutoencoderKLWan
# ----------------------------------------------------------------------------------------------

_VAE_RESIDUAL = [
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]
_VAE_ATTENTION = [("norm.gamma", "norm.gamma"), ("to_qkv.", "to_qkv."), ("proj.", "proj.")]
_VAE_FIXED = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("encoder.head.0.gamma", "encoder.norm_out.gamma"),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.head.0.gamma", "decoder.norm_out.gamma"),
    ("decoder.head.2.", "decoder.conv_out."),
]


def _vae_layout(keys) -> int:
    """Residual blocks per encoder stage (the index of the first Resample in ``encoder.downsamples``)."""
    pattern = re.compile(r"encoder\.downsamples\.(\d+)\.resample\.")
    resamples = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
    if not resamples:
        raise ValueError("Not a Wan VAE checkpoint: no encoder.downsamples.*.resample keys.")
    if any(re.match(r"(en|de)coder\.(down|up)samples\.\d+\.to_qkv", k) for k in keys):
        raise ValueError("Wan VAE checkpoints with attention in the down/up blocks (attn_scales) are not supported.")
    return resamples[0]


def _map_residual(rest: str) -> str | None:
    for wan, dif in _VAE_RESIDUAL:
        if rest.startswith(wan):
            return dif + rest[len(wan):]
    return None


def wan_vae_to_diffusers_key(key: str, num_res_blocks: int) -> str | None:
    """diffusers ``AutoencoderKLWan`` key of a Wan VAE key (None if unknown).

    The decoder's flat ``upsamples`` list holds, per stage, ``num_res_blocks + 1`` residual blocks
    and (except the last stage) one Resample; diffusers groups them as ``up_blocks.{stage}``.
    """
    for wan, dif in _VAE_FIXED:
        if key.startswith(wan) and (wan.endswith(".") or key == wan):
            return dif + key[len(wan):]
    if m := re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)$", key):
        part, index, rest = m.groups()
        if index == "1":
            mapped = next((d + rest[len(w):] for w, d in _VAE_ATTENTION if rest.startswith(w)), None)
            return f"{part}.mid_block.attentions.0.{mapped}" if mapped else None
        mapped = _map_residual(rest)
        return f"{part}.mid_block.resnets.{int(index) // 2}.{mapped}" if mapped else None
    if m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)$", key):
        index, rest = m.groups()
        if rest.startswith(("resample.", "time_conv.")):
            return key.replace("encoder.downsamples.", "encoder.down_blocks.")
        mapped = _map_residual(rest)
        return f"encoder.down_blocks.{index}.{mapped}" if mapped else None
    if m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)$", key):
        index, rest = int(m.group(1)), m.group(2)
        stage, position = divmod(index, num_res_blocks + 2)
        if rest.startswith(("resample.", "time_conv.")):
            return f"decoder.up_blocks.{stage}.upsamplers.0.{rest}" if position == num_res_blocks + 1 else None
        mapped = _map_residual(rest)
        return f"decoder.up_blocks.{stage}.resnets.{position}.{mapped}" if mapped else None
    return None


def wan_vae_to_diffusers(state_dict: dict) -> dict:
    """Rename a Wan VAE state dict (``Wan2.1_VAE.pth``) to diffusers ``AutoencoderKLWan`` keys."""
    num_res_blocks = _vae_layout(state_dict)
    return _rename_all(state_dict, lambda k: wan_vae_to_diffusers_key(k, num_res_blocks), "Wan VAE")


def diffusers_vae_to_wan(state_dict: dict) -> dict:
    """Rename a diffusers ``AutoencoderKLWan`` state dict to Wan VAE keys (inverse of
    :func:`wan_vae_to_diffusers`)."""
    resnets = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    if not resnets:
        raise ValueError("Not a diffusers AutoencoderKLWan state dict: no decoder.up_blocks.0.resnets keys.")
    num_res_blocks = max(resnets)  # up blocks hold num_res_blocks + 1 resnets
    inverse = {}
    for key in state_dict:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", key):
            stage, _, position, rest = m.groups()
            index = int(stage) * (num_res_blocks + 2) + (int(position) if position is not None else num_res_blocks + 1)
            wan_rest = rest if position is None else next(
                (w + rest[len(d):] for w, d in _VAE_RESIDUAL if rest.startswith(d)), None)
            inverse[key] = f"decoder.upsamples.{index}.{wan_rest}" if wan_rest else None
            continue
        candidates = [key.replace(d, w, 1) for w, d in _VAE_FIXED if key.startswith(d)]
        if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)$", key):
            part, kind, index, rest = m.groups()
            table = _VAE_ATTENTION if kind == "attentions" else _VAE_RESIDUAL
            middle = 1 if kind == "attentions" else 2 * int(index)
            wan_rest = next((w + rest[len(d):] for w, d in table if rest.startswith(d)), None)
            candidates = [f"{part}.middle.{middle}.{wan_rest}"] if wan_rest else []
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)$", key):
            index, rest = m.groups()
            wan_rest = rest if rest.startswith(("resample.", "time_conv.")) else next(
                (w + rest[len(d):] for w, d in _VAE_RESIDUAL if rest.startswith(d)), None)
            candidates = [f"encoder.downsamples.{index}.{wan_rest}"] if wan_rest else []
        inverse[key] = candidates[0] if candidates else None
    out = {}
    for key, value in state_dict.items():
        if inverse[key] is None:
            raise ValueError(f"diffusers VAE key {key!r} has no Wan counterpart.")
        out[inverse[key]] = value
    return out


def vae_config_from_wan(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``AutoencoderKLWan`` kwargs (architecture only) of a Wan VAE checkpoint, from its shapes."""
    num_res_blocks = _vae_layout(shapes)
    base_dim = shapes["encoder.conv1.weight"][0]
    z_dim = shapes["conv2.weight"][0]
    stages, index, temporal = [], 0, []
    while f"encoder.downsamples.{index}.residual.2.weight" in shapes:
        stages.append(shapes[f"encoder.downsamples.{index}.residual.2.weight"][0] // base_dim)
        index += num_res_blocks
        if f"encoder.downsamples.{index}.resample.1.weight" in shapes:
            temporal.append(f"encoder.downsamples.{index}.time_conv.weight" in shapes)
            index += 1
    return dict(base_dim=base_dim, z_dim=z_dim, dim_mult=stages, num_res_blocks=num_res_blocks,
                attn_scales=[], temperal_downsample=temporal)


# Wan2.1's latent normalisation (wan/modules/vae.py, WanVAE.__init__): not stored in Wan2.1_VAE.pth.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
