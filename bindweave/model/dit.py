"""The Wan2.1 diffusion transformer with configurable, named, summed cross-attention branches.

Single-device model code. FSDP, activation checkpointing and ``torch.compile`` are applied from
outside (see ``bindweave/parallel/per_block.py``); nothing here knows about devices or ranks.

Data flow (shapes for one sample batch):

    x (B, C_in, F, H, W) ──patch_embedding──▶ tokens (B, L=F·H/2·W/2, D)
    timestep (B,) ──sinusoid──▶ time_embedding (B, D) ──time_modulation──▶ (B, 6, D)
    context[name] (B, L_name, C_name) ──context_embedders[name]──▶ (B, L_name, D)
    tokens ──N × WanBlock(self-attn + RoPE, Σ_branches cross-attn, FFN)──▶ head ──▶ unpatchify
    ──▶ (B, C_out, F, H, W)

A model with the single branch ``text`` is Wan T2V; with ``text`` + ``image`` it is Wan I2V.
BindWeave feeds ``text`` with [MLLM-connector tokens; T5 tokens] and ``image`` with CLIP tokens of
every reference (see ``conditioners/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bindweave.errors import UserError
from bindweave.model.attention import attention


@dataclass
class CrossAttentionBranch:
    """One named key/value stream of the cross-attention.

    Args:
        name: name the conditioners use to feed this branch (e.g. ``text``, ``image``).
        context_dim: feature size of the tokens fed to this branch (4096 for umt5-xxl, 1280 for CLIP ViT-H).
        embedder: how tokens are projected to the model width once per forward: ``mlp`` is Wan's text
            projection (Linear, GELU-tanh, Linear); ``norm_mlp`` is Wan's image projection
            (LayerNorm, Linear, GELU, Linear, LayerNorm).
        position: add fixed sin-cos features of each token's index among its sample's real tokens
            (padding never moves them) to its embedded token (no parameters; not in Wan).
            Cross-attention keys carry no order of their own: a trained T5's tokens already know
            their clause, a random-weight encoder's do not (docs/results.md: a reader of random umt5
            features learns which subject "starts at the top left" only with them), and the image
            branch's tokens then tell which reference they come from.
        refiner_layers: trainable pre-norm transformer layers (self-attention over the branch's
            tokens, padding masked, then an MLP) after the embedder and position features, run once
            per forward (not in Wan; HunyuanVideo's "token refiner" and Lumina-Next's "context
            refiner" are the same idea). The DiT reads its condition only by cross-attention, so a
            token cannot learn from its neighbours which clause it belongs to ("right" in "starts at
            the right" vs "moves to the right") unless the encoder already wrote it there, as a
            trained T5 does and a random-weight one does not. 0: none (Wan).
        keep_tokens: with ``overflow_to``, only this branch's first ``keep_tokens`` embedded tokens
            go through its own key/value projections; the rest are handed to ``overflow_to``.
            None: all of them (Wan). The released BindWeave embeds 4 x 257 CLIP tokens with the
            image embedder and keeps 257 (its ``clip_token_len``) in the image branch.
        overflow_to: the branch whose key/value projections attend this branch's tokens past
            ``keep_tokens``: they join that branch's softmax, placed *before* its own tokens (the
            release: CLIP tokens of references 2-4 in the text softmax, before MLLM and T5 tokens).
            Routed once per forward; no cost when None.
    """

    name: str
    context_dim: int
    embedder: Literal["mlp", "norm_mlp"] = "mlp"
    position: bool = False
    refiner_layers: int = 0
    keep_tokens: int | None = None
    overflow_to: str | None = None


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weight/input dtype; returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's sinusoidal timestep features: [cos, sin] of t · 10000^(-i/half). (B,) -> (B, dim) fp32."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float64, device=timestep.device) / half
    angles = timestep.to(torch.float64)[:, None] * torch.pow(10000.0, -exponent)[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()  # (B, dim)


def token_positions(tokens: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Sin-cos features of each condition token's index among its sample's *real* tokens:
    (B, L, C) tokens and (B, L) bool mask (True = real; None: all real) -> (L, dim) or (B, L, dim) fp32.

    Counting real tokens only keeps a sample's features independent of how its batch is padded:
    several conditioners feed one branch (the connector's MLLM tokens, then T5's), each padded to the
    batch's longest, so a plain index would move the second part with the batch's longest first part
    (training batches, batch-of-one sampling and CFG's null side would each see other positions)."""
    if mask is None:
        return timestep_sinusoid(torch.arange(tokens.shape[1], device=tokens.device), dim)  # (L, dim)
    index = (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, L): 0, 1, ... over real tokens
    return timestep_sinusoid(index.flatten(), dim).view(*index.shape, dim)  # (B, L, dim)


class ContextEmbedder(nn.Module):
    """Projects one branch's condition tokens to the model width (Wan's text / image embedders)."""

    def __init__(self, context_dim: int, dim: int, kind: Literal["mlp", "norm_mlp"]) -> None:
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(context_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
            )
        elif kind == "norm_mlp":
            self.net = nn.Sequential(
                FP32LayerNorm(context_dim),
                nn.Linear(context_dim, context_dim),
                nn.GELU(),
                nn.Linear(context_dim, dim),
                FP32LayerNorm(dim),
            )
        else:
            raise UserError(f"Unknown context embedder {kind!r}: use 'mlp' or 'norm_mlp'.")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)  # (B, L, C) -> (B, L, D)


class RefinerLayer(nn.Module):
    """A pre-norm transformer layer over one branch's condition tokens (``refiner_layers``):
    ``x + attn(norm(x))`` with padded keys masked, then ``x + mlp(norm(x))``. Its output
    projections start at zero, so a new refiner passes the tokens through unchanged."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_attn = FP32LayerNorm(dim, eps=eps)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim)
        self.norm_mlp = FP32LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.to_qkv(self.norm_attn(x)).chunk(3, dim=-1)  # 3 x (B, L, D)
        q = self.norm_q(q).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(k).unflatten(-1, (self.num_heads, -1))
        v = v.unflatten(-1, (self.num_heads, -1))
        x = x + self.to_out(attention(q, k, v, mask).flatten(2))  # (B, L, D)
        return x + self.mlp(self.norm_mlp(x))


# ----------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ----------------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dimension over (t, h, w): h and w get 2·(Dh // 6), t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(grid: tuple[int, int, int], dim: int, device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    """Position angles of a (frames, height, width) token grid, float64 (f, h, w, dim/2): ``dim`` is
    split over (t, h, w) by :func:`rope_axis_dims`, and each axis part holds position ·
    theta^(-i/half) for its ``half`` frequencies. Shared by RoPE and the absolute position table."""
    angles = []
    for size, axis_dim, expand in zip(grid, rope_axis_dims(dim), range(3)):
        inv_freq = 1.0 / theta ** (
            torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
        )  # (axis_dim/2,)
        pos = torch.arange(size, dtype=torch.float64, device=device)
        axis_angles = torch.outer(pos, inv_freq)  # (size, axis_dim/2)
        shape = [1, 1, 1, axis_angles.shape[-1]]
        shape[expand] = size
        angles.append(axis_angles.view(shape).expand(*grid, -1))  # (f, h, w, axis_dim/2)
    return torch.cat(angles, dim=-1)  # (f, h, w, dim/2)


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for a (frames, height, width) token grid, flattened in (f, h, w) order.

    Computed in float64 once per forward (not per block), returned as float32 (L, 1, Dh/2).
    """
    table = _axis_angles(grid, head_dim, device, theta).reshape(-1, 1, head_dim // 2)  # (L, 1, Dh/2)
    return torch.cos(table).float(), torch.sin(table).float()


def absolute_position_table(grid: tuple[int, int, int], dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 3D sin-cos position features for a (frames, height, width) token grid: (L, dim) fp32.

    RoPE's angles (:func:`_axis_angles`: the width split over (t, h, w)); each axis part becomes
    [cos, sin] of its angles (the ViT/DiT table, one per axis), flattened in (f, h, w) order.
    """
    angles = _axis_angles(grid, dim, device).reshape(-1, dim // 2)  # (L, dim/2)
    parts = angles.split([axis_dim // 2 for axis_dim in rope_axis_dims(dim)], dim=-1)
    return torch.cat([torch.cat([torch.cos(a), torch.sin(a)], dim=-1) for a in parts], dim=-1).float()  # (L, dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of (B, L, H, Dh) by the position angles, in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, Dh/2) each
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, L, H, Dh/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, L, H, Dh)


# ----------------------------------------------------------------------------------------------
# Attention layers
# ----------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Self-attention over video tokens with RMS q/k norm (across heads) and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        # The attention kernel; sequence parallelism swaps in its all-to-all version from outside.
        self.attention_fn = attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(self.to_k(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        v = self.to_v(x).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attention_fn(q, k, v, key_mask)  # (B, L, H, Dh)
        return self.to_out(out.flatten(2))  # (B, L, D)


class BranchKeyValue(nn.Module):
    """Key/value projections (and RMS key norm) of one cross-attention branch."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_k = nn.RMSNorm(dim, eps=eps)


class CrossAttention(nn.Module):
    """Cross-attention whose named branches share the query and add their outputs.

    ``out = to_out(Σ_b attention(q, k_b, v_b))``: with branches ``text`` and ``image`` this is
    exactly Wan2.1-I2V's decoupled cross-attention.
    """

    def __init__(self, dim: int, num_heads: int, branch_names: list[str], eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.branches = nn.ModuleDict({name: BranchKeyValue(dim, eps) for name in branch_names})
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: dict[str, torch.Tensor],
        context_mask: dict[str, torch.Tensor | None],
    ) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        out = None
        for name, kv in self.branches.items():
            tokens = context[name]  # (B, Lc, D)
            k = kv.norm_k(kv.to_k(tokens)).unflatten(-1, (self.num_heads, -1))  # (B, Lc, H, Dh)
            v = kv.to_v(tokens).unflatten(-1, (self.num_heads, -1))  # (B, Lc, H, Dh)
            branch_out = attention(q, k, v, context_mask.get(name))  # (B, L, H, Dh)
            out = branch_out if out is None else out + branch_out
        return self.to_out(out.flatten(2))  # (B, L, D)


# ----------------------------------------------------------------------------------------------
# Transformer block and output head
# ----------------------------------------------------------------------------------------------


class WanBlock(nn.Module):
    """One Wan2.1 block: adaLN-modulated self-attention, cross-attention, adaLN-modulated FFN."""

    def __init__(
        self, dim: int, ffn_dim: int, num_heads: int, branch_names: list[str], eps: float
    ) -> None:
        super().__init__()
        self.norm_self = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm_cross = FP32LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, branch_names, eps)
        self.norm_ffn = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        # Learned offsets added to the timestep modulation: shift/scale/gate for attn and FFN.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: dict[str, torch.Tensor],
        context_mask: dict[str, torch.Tensor | None],
        token_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # x: (B, L, D); time_mod: (B, 6, D) fp32
        mod = (self.modulation.float() + time_mod).unsqueeze(2)  # (B, 6, 1, D)
        attn_shift, attn_scale, attn_gate, ffn_shift, ffn_scale, ffn_gate = mod.unbind(1)

        # 1. Self-attention
        h = self.norm_self(x.float()) * (1 + attn_scale) + attn_shift  # (B, L, D) fp32
        h = self.self_attn(h.type_as(x), cos, sin, token_mask)  # (B, L, D)
        x = (x.float() + h.float() * attn_gate).type_as(x)

        # 2. Cross-attention (summed branches)
        h = self.norm_cross(x.float()).type_as(x)
        x = x + self.cross_attn(h, context, context_mask)

        # 3. Feed-forward
        h = self.norm_ffn(x.float()) * (1 + ffn_scale) + ffn_shift  # (B, L, D) fp32
        h = self.ffn(h.type_as(x))  # (B, L, D)
        return (x.float() + h.float() * ffn_gate).type_as(x)


class OutputHead(nn.Module):
    """adaLN-modulated final norm and the linear projection back to patch pixels."""

    def __init__(self, dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + time_emb[:, None].float()).unsqueeze(2).unbind(1)
        h = self.norm(x.float()) * (1 + scale) + shift  # (B, L, D)
        return self.proj(h.type_as(x))  # (B, L, C_out·pt·ph·pw)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    """Wan2.1 video DiT with named, summed cross-attention branches.

    Args:
        in_channels: channels of the DiT input (16 for T2V; 36 = 16 noisy + 4 mask + 16 reference
            latent for I2V / BindWeave).
        out_channels: channels predicted (the VAE latent channels, 16 for Wan).
        dim: model width (1536 for 1.3B, 5120 for 14B).
        ffn_dim: hidden size of the feed-forward (8960 for 1.3B, 13824 for 14B).
        num_heads: attention heads (12 for 1.3B, 40 for 14B); dim / num_heads is the head size.
        num_layers: number of transformer blocks (30 for 1.3B, 40 for 14B).
        branches: the cross-attention branches; ``[text]`` is T2V, ``[text, image]`` is I2V.
        patch_size: (t, h, w) patch of the 3D patch embedding.
        freq_dim: size of the sinusoidal timestep features.
        eps: epsilon of the layer and RMS norms.
        absolute_position: also add fixed 3D sin-cos position features to the patch tokens (no
            parameters; not in Wan, whose only positions are RoPE's relative ones). For small models
            trained briefly on prompts that name absolute places ("starts at the top left") and on
            reference slots that differ only by their frame index.
    """

    def __init__(
        self,
        in_channels: int = 36,
        out_channels: int = 16,
        dim: int = 1536,
        ffn_dim: int = 8960,
        num_heads: int = 12,
        num_layers: int = 30,
        branches: list[CrossAttentionBranch] | None = None,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        freq_dim: int = 256,
        eps: float = 1e-6,
        absolute_position: bool = False,
    ) -> None:
        super().__init__()
        branches = list(branches) if branches is not None else [CrossAttentionBranch("text", 4096)]
        names = [b.name for b in branches]
        if not branches or len(set(names)) != len(names):
            raise UserError(f"WanDiT needs at least one branch and unique branch names, got {names}.")
        if dim % num_heads or (dim // num_heads) % 2:
            raise UserError(
                f"dim={dim} must split into num_heads={num_heads} heads of an even size."
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dim, self.num_heads, self.freq_dim = dim, num_heads, freq_dim
        self.patch_size = tuple(patch_size)
        self.branches = {b.name: b for b in branches}
        self.absolute_position = absolute_position

        self.patch_embedding = nn.Conv3d(
            in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.context_embedders = nn.ModuleDict(
            {b.name: ContextEmbedder(b.context_dim, dim, b.embedder) for b in branches}
        )
        for b in branches:
            if b.refiner_layers < 0:
                raise UserError(f"Branch {b.name!r}: refiner_layers must be >= 0, got {b.refiner_layers}.")
            if (b.keep_tokens is None) != (b.overflow_to is None):
                raise UserError(f"Branch {b.name!r}: set keep_tokens and overflow_to together (or neither).")
            if b.overflow_to is not None and (b.overflow_to not in names or b.overflow_to == b.name
                                              or b.keep_tokens < 0):
                raise UserError(
                    f"Branch {b.name!r}: overflow_to must name another branch of {names} and keep_tokens be "
                    f">= 0; got overflow_to={b.overflow_to!r}, keep_tokens={b.keep_tokens}.")
        self.context_refiners = nn.ModuleDict({  # only branches with refiner layers: Wan's keys stay as they are
            b.name: nn.ModuleList(RefinerLayer(dim, num_heads, eps) for _ in range(b.refiner_layers))
            for b in branches if b.refiner_layers
        })
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            [WanBlock(dim, ffn_dim, num_heads, names, eps) for _ in range(num_layers)]
        )
        self.head = OutputHead(dim, out_channels * math.prod(self.patch_size), eps)
        self.initialize_weights()

    # -- init ----------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """All weight init in one place (Wan's scheme): xavier linears, N(0, 0.02) embedders,
        zero output projection so an untrained model predicts zero velocity.

        Each step goes through ``Module.apply`` and touches only the visited module's own weights,
        so a strategy that shards weights as they are built (DeepSpeed ZeRO-3's ``zero.Init``
        gathers a module's weights around each ``apply`` call) initialises them as one device does;
        the draws come in the same order as a loop over ``modules()``."""

        def linear(init):
            def fn(module: nn.Module) -> None:
                if isinstance(module, nn.Linear):
                    init(module.weight)
            return fn

        def xavier_with_zero_bias(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        def patch_embedding(module: nn.Module) -> None:
            if module is self.patch_embedding:
                nn.init.xavier_uniform_(module.weight.flatten(1))
                nn.init.zeros_(module.bias)

        self.apply(xavier_with_zero_bias)
        self.patch_embedding.apply(patch_embedding)
        for embedder in self.context_embedders.values():
            embedder.apply(linear(lambda w: nn.init.normal_(w, std=0.02)))
        self.time_embedding.apply(linear(lambda w: nn.init.normal_(w, std=0.02)))
        for layers in self.context_refiners.values():
            for layer in layers:  # residual branches start at zero: a new refiner is the identity
                layer.to_out.apply(linear(nn.init.zeros_))
                layer.mlp[2].apply(linear(nn.init.zeros_))
        self.head.proj.apply(linear(nn.init.zeros_))

    def initialize_new_branch(self, name: str) -> None:
        """Initialise branch ``name`` as a new condition of a pretrained DiT (STYLE rule 5): its
        embedder and key projections as :meth:`initialize_weights` does, its norms reset, and its
        value projections zero, so the branch adds exactly nothing until training moves it. The
        branch's parameters must be materialised (``to_empty``) and are initialised in place."""
        parts = [self.context_embedders[name]] + [block.cross_attn.branches[name] for block in self.blocks]
        with torch.no_grad():
            for part in parts:
                for module in part.modules():
                    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                        module.reset_parameters()
            for module in self.context_embedders[name].modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
            for block in self.blocks:
                kv = block.cross_attn.branches[name]
                nn.init.xavier_uniform_(kv.to_k.weight)
                nn.init.zeros_(kv.to_k.bias)
                nn.init.zeros_(kv.to_v.weight)
                nn.init.zeros_(kv.to_v.bias)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def check_wan_compatible(self, target: str) -> None:
        """Raise if this DiT uses options that Wan's layouts (official, diffusers) cannot express:
        converted there, its weights would run without them and predict something else."""
        options = (["absolute_position"] if self.absolute_position else []) + [
            f"position on branch {name!r}" for name, branch in self.branches.items() if branch.position] + [
            f"overflow of branch {name!r} to {branch.overflow_to!r}" for name, branch in self.branches.items()
            if branch.overflow_to is not None] + [
            f"refiner layers on branch {name!r}" for name in self.context_refiners]
        if options:
            raise ValueError(
                f"This DiT uses {', '.join(options)}, which {target} does not have: converted weights "
                f"would run without them. Save it with `bindweave weights export` (BindWeave's own layout) instead."
            )

    def embed_context(
        self, context: dict[str, torch.Tensor], context_mask: dict[str, torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Project every branch's tokens to the model width: {name: (B, L, C)} -> {name: (B, L, D)};
        ``context_mask`` ({name: (B, L) bool, True for real tokens}) keeps padding out of the
        refiners (branches without one ignore it).

        Call once and pass ``context_embedded=True`` to :meth:`forward` to reuse it across sampling steps.
        """
        if set(context) != set(self.branches):
            raise ValueError(
                f"The DiT has cross-attention branches {sorted(self.branches)} but got context for "
                f"{sorted(context)}. Feed every branch exactly once (check the conditioners' "
                f"`branch` names against the DiT's `branches`)."
            )
        embedded = {}
        for name, tokens in context.items():
            expected = self.branches[name].context_dim
            if tokens.ndim != 3 or tokens.shape[-1] != expected:
                raise ValueError(
                    f"Context for branch {name!r} has shape {tuple(tokens.shape)}, expected "
                    f"(B, L, {expected}). Set the branch's context_dim to the conditioner's output size."
                )
            weight_dtype = self.patch_embedding.weight.dtype
            embedded[name] = self.context_embedders[name](tokens.to(weight_dtype))  # (B, L, D)
            if self.branches[name].position:
                mask = (context_mask or {}).get(name)
                embedded[name] = embedded[name] + token_positions(tokens, mask, self.dim).to(weight_dtype)
            for layer in self.context_refiners[name] if name in self.context_refiners else ():
                embedded[name] = layer(embedded[name], (context_mask or {}).get(name))  # (B, L, D)
        return embedded

    def route_context(
        self, context: dict[str, torch.Tensor], context_mask: dict[str, torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """Hand each branch's embedded tokens past ``keep_tokens`` to its ``overflow_to`` branch,
        before that branch's own tokens ({name: (B, L, D)} in, the same out with moved lengths);
        masks move with their tokens. Identity for DiTs without overflow."""
        for name, branch in self.branches.items():
            if branch.overflow_to is None:
                continue
            keep, target = branch.keep_tokens, branch.overflow_to
            tokens, own = context[name], context[target]  # (B, L, D), (B, L_t, D)
            mask, own_mask = context_mask.get(name), context_mask.get(target)
            context = {**context, name: tokens[:, :keep],  # (B, keep, D)
                       target: torch.cat([tokens[:, keep:], own], dim=1)}  # (B, L - keep + L_t, D)
            if mask is not None or own_mask is not None:
                mask = mask if mask is not None else _all_real(tokens)  # (B, L)
                own_mask = own_mask if own_mask is not None else _all_real(own)  # (B, L_t)
                context_mask = {**context_mask, name: mask[:, :keep],
                                target: torch.cat([mask[:, keep:], own_mask], dim=1)}  # (B, L - keep + L_t)
        return context, context_mask

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a helpful ValueError if ``x`` cannot be patchified by this model."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DiT input must be (B, {self.in_channels}, F, H, W), got {tuple(x.shape)}."
            )
        for size, patch, axis in zip(x.shape[2:], self.patch_size, "FHW"):
            if size % patch:
                raise ValueError(
                    f"Latent {axis}={size} is not divisible by the patch size {patch}; choose a video "
                    f"size whose latent is a multiple of the patch (pixels: multiples of {8 * patch})."
                )

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: dict[str, torch.Tensor],
        context_mask: dict[str, torch.Tensor] | None = None,
        frame_mask: torch.Tensor | None = None,
        context_embedded: bool = False,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: (B, C_in, F, H, W) DiT input (noisy latent, plus conditioning channels).
            timestep: (B,) flow time in [0, 1000].
            context: {branch: (B, L_branch, C_branch)} condition tokens, one entry per branch.
            context_mask: {branch: (B, L_branch) bool} True for real tokens; a missing or None
                entry attends to every token.
            frame_mask: (B, F) bool, False for latent frames that are padding (e.g. unused
                reference slots); their tokens are excluded as keys from self-attention.
            context_embedded: ``context`` already went through :meth:`embed_context`.

        Returns:
            (B, C_out, F, H, W) predicted velocity.
        """
        state = self.embed(x, timestep, context, context_mask, frame_mask, context_embedded)
        tokens = self.run_blocks(state.tokens, state)  # (B, L, D)
        return self.unembed(tokens, state)  # (B, C_out, F, H, W)

    def embed(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: dict[str, torch.Tensor],
        context_mask: dict[str, torch.Tensor] | None = None,
        frame_mask: torch.Tensor | None = None,
        context_embedded: bool = False,
    ) -> "DiTState":
        """Stage 1 of :meth:`forward`: patch tokens, timestep modulation, RoPE tables, context."""
        self.check_input(x)
        pt, ph, pw = self.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        if not context_embedded:
            context = self.embed_context(context, context_mask)  # {name: (B, Lc, D)}

        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # (B, D, f, h, w)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, L, D)
        if self.absolute_position:
            tokens = tokens + absolute_position_table(grid, self.dim, x.device).to(tokens.dtype)  # (B, L, D)
        cos, sin = rope_cos_sin(grid, self.head_dim, x.device)  # (L, 1, Dh/2)

        time_features = timestep_sinusoid(timestep, self.freq_dim)  # (B, freq_dim)
        time_emb = self.time_embedding(time_features.to(tokens.dtype)).float()  # (B, D)
        time_mod = self.time_modulation(time_emb.to(tokens.dtype)).float().unflatten(1, (6, -1))  # (B, 6, D)

        context, context_mask = self.route_context(context, dict(context_mask or {}))  # {name: (B, Lc, D)}
        token_mask = None
        if frame_mask is not None:
            token_mask = frame_mask[:, ::pt].repeat_interleave(grid[1] * grid[2], dim=1)  # (B, L)
        return DiTState(tokens, time_emb, time_mod, cos, sin, context, context_mask, token_mask,
                        tuple(x.shape), grid)

    def run_blocks(self, tokens: torch.Tensor, state: "DiTState", start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stage 2: the transformer blocks over (B, L, D) tokens (or a sequence shard of them);
        ``start``/``stop`` run only ``blocks[start:stop]`` (a step cache runs the first block apart)."""
        for block in self.blocks[start:stop]:
            tokens = block(tokens, state.time_mod, state.cos, state.sin, state.context, state.context_mask,
                           state.token_mask)  # (B, L, D)
        return tokens

    def unembed(self, tokens: torch.Tensor, state: "DiTState") -> torch.Tensor:
        """Stage 3: output head and unpatchify, (B, L, D) -> (B, C_out, F, H, W)."""
        return self.unpatchify(self.head(tokens, state.time_emb), state)  # (B, C_out, F, H, W)

    def unpatchify(self, out: torch.Tensor, state: "DiTState") -> torch.Tensor:
        """The head's per-token output (B, L, C_out·pt·ph·pw) as a video (B, C_out, F, H, W)."""
        batch, _, frames, height, width = state.input_shape
        pt, ph, pw = self.patch_size
        out = out.view(batch, *state.grid, pt, ph, pw, self.out_channels)  # (B, f, h, w, pt, ph, pw, C)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return out.reshape(batch, self.out_channels, frames, height, width)  # (B, C_out, F, H, W)


def _all_real(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) True mask for (B, L, D) tokens."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


@dataclass
class DiTState:
    """Everything the blocks and the head need besides the tokens (see :meth:`WanDiT.embed`).

    Attributes:
        tokens: (B, L, D) patch tokens.
        time_emb: (B, D) fp32 timestep embedding (the head's modulation input).
        time_mod: (B, 6, D) fp32 block modulation.
        cos: (L, 1, Dh/2) RoPE cosines.
        sin: (L, 1, Dh/2) RoPE sines.
        context: {branch: (B, Lc, D)} embedded condition tokens.
        context_mask: {branch: (B, Lc) bool}.
        token_mask: (B, L) bool self-attention key mask, or None.
        input_shape: shape of the DiT input x.
        grid: (f, h, w) token grid.
    """

    tokens: torch.Tensor
    time_emb: torch.Tensor
    time_mod: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    context: dict[str, torch.Tensor]
    context_mask: dict[str, torch.Tensor | None]
    token_mask: torch.Tensor | None
    input_shape: tuple[int, ...]
    grid: tuple[int, int, int]
