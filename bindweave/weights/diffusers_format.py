"""State-dict conversion between diffusers' ``WanTransformer3DModel`` and :class:`WanDiT`.

Both directions, exact (a pure renaming: no tensor is changed). This is what makes released Wan2.1
weights usable: ``diffusers_to_bindweave(WanTransformer3DModel.from_pretrained(path).state_dict())``.

diffusers has one text key/value stream (``attn2.to_k``) and, for I2V, one "added" stream
(``attn2.add_k_proj``) fed by the image embedder; they map to two named branches of :class:`WanDiT`,
``text`` and ``image`` by default.
"""

from __future__ import annotations

import re

import torch

from bindweave.model.dit import CrossAttentionBranch, WanDiT

# (bindweave key pattern, diffusers key pattern); "{i}" is a block index.
_TOP_LEVEL = [
    ("patch_embedding.", "patch_embedding."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_modulation.1.", "condition_embedder.time_proj."),
    ("context_embedders.{text}.net.0.", "condition_embedder.text_embedder.linear_1."),
    ("context_embedders.{text}.net.2.", "condition_embedder.text_embedder.linear_2."),
    ("context_embedders.{image}.net.0.", "condition_embedder.image_embedder.norm1."),
    ("context_embedders.{image}.net.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("context_embedders.{image}.net.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("context_embedders.{image}.net.4.", "condition_embedder.image_embedder.norm2."),
    ("head.proj.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
]
_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("self_attn.to_q.", "attn1.to_q."),
    ("self_attn.to_k.", "attn1.to_k."),
    ("self_attn.to_v.", "attn1.to_v."),
    ("self_attn.to_out.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("norm_cross.", "norm2."),
    ("cross_attn.to_q.", "attn2.to_q."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.to_out.", "attn2.to_out.0."),
    ("cross_attn.branches.{text}.to_k.", "attn2.to_k."),
    ("cross_attn.branches.{text}.to_v.", "attn2.to_v."),
    ("cross_attn.branches.{text}.norm_k.", "attn2.norm_k."),
    ("cross_attn.branches.{image}.to_k.", "attn2.add_k_proj."),
    ("cross_attn.branches.{image}.to_v.", "attn2.add_v_proj."),
    ("cross_attn.branches.{image}.norm_k.", "attn2.norm_added_k."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
]


def _prefix_table(text: str, image: str) -> list[tuple[str, str]]:
    """(bindweave prefix, diffusers prefix) pairs; block keys use the prefix after ``blocks.{i}.``."""
    top = [(ours.format(text=text, image=image), theirs) for ours, theirs in _TOP_LEVEL]
    block = [("blocks.{i}." + ours.format(text=text, image=image), "blocks.{i}." + theirs) for ours, theirs in _BLOCK]
    return top + block


def _rename(state_dict: dict[str, torch.Tensor], table: list[tuple[str, str]], source: str) -> dict[str, torch.Tensor]:
    """Replace the first matching source prefix of every key by its target prefix."""
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        match = re.match(r"blocks\.(\d+)\.", key)
        index = match.group(1) if match else None
        for src, dst in table:
            if ("{i}" in src) != (index is not None):
                continue
            src, dst = src.replace("{i}", index or ""), dst.replace("{i}", index or "")
            if key.startswith(src):
                out[dst + key[len(src):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} {source} keys have no known mapping, e.g. {unknown[:5]}. Is this a Wan2.1 "
            f"transformer state dict, and do text_branch/image_branch name the DiT's branches?"
        )
    return out


def diffusers_to_bindweave(
    state_dict: dict[str, torch.Tensor], text_branch: str = "text", image_branch: str = "image"
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to :class:`WanDiT` keys."""
    table = [(theirs, ours) for ours, theirs in _prefix_table(text_branch, image_branch)]
    return _rename(state_dict, table, "diffusers")


def bindweave_to_diffusers(
    state_dict: dict[str, torch.Tensor], text_branch: str = "text", image_branch: str = "image"
) -> dict[str, torch.Tensor]:
    """Rename a :class:`WanDiT` state dict to diffusers ``WanTransformer3DModel`` keys."""
    return _rename(state_dict, _prefix_table(text_branch, image_branch), "bindweave")


def diffusers_config_for(dit: WanDiT, text_branch: str = "text", image_branch: str = "image") -> dict:
    """The ``WanTransformer3DModel`` config with the same architecture as ``dit``."""
    extra = set(dit.branches) - {text_branch, image_branch}
    if text_branch not in dit.branches or extra:
        raise ValueError(
            f"diffusers' Wan has a text stream and optionally one image stream; this DiT has branches "
            f"{sorted(dit.branches)}. Pass text_branch/image_branch naming them."
        )
    dit.check_wan_compatible("diffusers' WanTransformer3DModel")
    image = dit.branches.get(image_branch)
    return dict(
        patch_size=dit.patch_size,
        num_attention_heads=dit.num_heads,
        attention_head_dim=dit.head_dim,
        in_channels=dit.in_channels,
        out_channels=dit.out_channels,
        text_dim=dit.branches[text_branch].context_dim,
        freq_dim=dit.freq_dim,
        ffn_dim=dit.blocks[0].ffn[0].out_features,
        num_layers=len(dit.blocks),
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=dit.blocks[0].norm_self.eps,
        image_dim=image.context_dim if image else None,
        added_kv_proj_dim=dit.dim if image else None,
    )


def bindweave_config_for(diffusers_config: dict) -> dict:
    """:class:`WanDiT` arguments equivalent to a diffusers ``WanTransformer3DModel`` config."""
    c = diffusers_config
    branches = [CrossAttentionBranch("text", c["text_dim"], "mlp")]
    if c.get("image_dim"):
        branches.append(CrossAttentionBranch("image", c["image_dim"], "norm_mlp"))
    return dict(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        dim=c["num_attention_heads"] * c["attention_head_dim"],
        ffn_dim=c["ffn_dim"],
        num_heads=c["num_attention_heads"],
        num_layers=c["num_layers"],
        branches=branches,
        patch_size=tuple(c["patch_size"]),
        freq_dim=c["freq_dim"],
        eps=c["eps"],
    )
