"""BindWeaveModel: the one network that training and sampling both call.

Batch ──conditioners──▶ Conditioning (context per branch, reference slots)
x_σ (B, z, T, h, w) ──[x_σ ; slots] on time, [noisy | mask | ref latent] on channels──▶ DiT
      ──▶ output (B, z, T+N, h, w) ──[:, :, :T]──▶ velocity (or x̂₀, turned into the velocity)
(with ``slot_placement: before``, the released BindWeave's layout: [slots ; x_σ] and [:, :, N:])

It owns the DiT, the VAE and the conditioners and knows nothing of Lightning: the LightningModule
(:class:`bindweave.training.module.BindWeave`) holds one and adds the loss, optimisers and checkpoint
handling; the sampler (:mod:`bindweave.inference.sampler`) and :class:`bindweave.inference.pipeline.BindWeavePipeline`
take one. Its state-dict keys (``dit.*``, ``conditioners.*``) are those of exports.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from bindweave.model.batch import check_num_frames, check_spatial_size
from bindweave.model.dit import WanDiT
from bindweave.model.flow import velocity_from_sample
from conditioners.base import Conditioner, Conditioning, merge
from encoders.base import VideoAutoencoder


def _as_float32(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached features as computed in float32 (a cache may store them in bfloat16)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in features.items()}


class BindWeaveModel(nn.Module):
    """DiT + VAE + conditioners, with what both training and sampling need of them.

    Args:
        conditioners: {name: conditioner}, in the order their tokens are concatenated per branch.
        prediction: what the DiT outputs: ``velocity`` (ε − x₀) or ``sample`` (x₀).
        mask_context_padding: mask padded condition tokens out of cross-attention.

    The DiT and the VAE are given by :meth:`attach` once built (``BindWeave.configure_model``), so
    a LightningModule can hold the model (and its conditioners' trainable parts) from construction.
    """

    def __init__(
        self,
        conditioners: dict[str, Conditioner],
        prediction: Literal["velocity", "sample"] = "velocity",
        mask_context_padding: bool = True,
    ) -> None:
        super().__init__()
        if not conditioners:
            raise ValueError("BindWeave needs at least one conditioner (e.g. `relational` for the prompt).")
        if prediction not in ("velocity", "sample"):
            raise ValueError(f"prediction must be 'velocity' or 'sample', got {prediction!r}.")
        self.conditioners = nn.ModuleDict(conditioners)
        self.prediction = prediction
        self.mask_context_padding = mask_context_padding
        self.dit: WanDiT | None = None
        self.vae: VideoAutoencoder | None = None

    # -- building ------------------------------------------------------------------------------

    def attach(self, dit: WanDiT, vae: VideoAutoencoder) -> None:
        """Give the model its built DiT and VAE (the conditioners are built against the same VAE)
        and check that the parts fit together."""
        self.dit, self.vae = dit, vae
        self.check_dimensions()

    def check_dimensions(self) -> None:
        """Raise ``ValueError`` (naming the setting to change) unless conditioners, VAE and DiT agree
        on branches, token sizes and input/output channels."""
        fed: dict[str, int] = {}
        slot_channels = 0
        for conditioner in self.conditioners.values():
            spec = conditioner.spec()
            slot_channels += spec.slot_channels
            for branch, size in spec.branches.items():
                name = type(conditioner).__name__
                if branch not in self.dit.branches:
                    raise ValueError(
                        f"{name} feeds branch {branch!r}, but the DiT only has {sorted(self.dit.branches)}; "
                        f"add the branch to the DiT's `branches` or change the conditioner's `branch`."
                    )
                if fed.setdefault(branch, size) != size:
                    raise ValueError(f"Conditioners feed branch {branch!r} with token sizes {fed[branch]} and {size}.")
                expected = self.dit.branches[branch].context_dim
                if size != expected:
                    raise ValueError(
                        f"{name} produces {size}-d tokens for branch {branch!r}, but the DiT branch "
                        f"expects context_dim={expected}; set the branch's context_dim to {size}."
                    )
        unfed = set(self.dit.branches) - set(fed)
        if unfed:
            raise ValueError(f"No conditioner feeds the DiT branches {sorted(unfed)}; add one or remove the branches.")
        latent = self.vae.latent_channels
        if self.dit.in_channels != latent + slot_channels:
            raise ValueError(
                f"The DiT takes {self.dit.in_channels} input channels but the VAE latent ({latent}) plus "
                f"the conditioners' slot channels ({slot_channels}) make {latent + slot_channels}; set the "
                f"DiT's in_channels to {latent + slot_channels}."
            )
        if self.dit.out_channels != latent:
            raise ValueError(f"The DiT predicts {self.dit.out_channels} channels but the VAE latent has {latent}.")

    # -- checks of a request --------------------------------------------------------------------

    def check_video(self, num_frames: int, height: int, width: int) -> None:
        """Raise ``ValueError`` unless the VAE and the DiT's patches can take this video size."""
        check_num_frames(num_frames)
        check_spatial_size(height, width, self.vae.spatial_compression * self.dit.patch_size[1])

    def size_warning(self, num_frames: int, height: int, width: int, made_for: tuple[int, int, int]) -> str | None:
        """What a user should know before sampling ``num_frames`` × ``height`` × ``width`` with a DiT
        that adds absolute position features (``absolute_position: true``): they hold only on the
        token grid it was trained on, ``made_for`` (frames, height, width: its sampling defaults).
        None when the size is that one (fewer frames are fine) or the DiT has none (RoPE is relative)."""
        frames, trained_height, trained_width = made_for
        if not getattr(self.dit, "absolute_position", False) or ((height, width) == (trained_height, trained_width)
                                                                  and num_frames <= frames):
            return None
        return (f"{num_frames}x{height}x{width} is not the {frames}x{trained_height}x{trained_width} this model samples "
                f"by default, and its DiT adds absolute position features that only hold on the token grid it was "
                f"trained on: expect a broken video; leave the size out to use {frames}x{trained_height}x{trained_width}.")

    @staticmethod
    def check_references(references: torch.Tensor, height: int, width: int) -> None:
        """Raise ``ValueError`` unless ``references`` is (B, N, 3, height, width)."""
        if references.ndim != 5 or references.shape[2] != 3 or tuple(references.shape[-2:]) != (height, width):
            raise ValueError(
                f"references must be (B, N, 3, {height}, {width}) RGB images at the video size, got "
                f"{tuple(references.shape)}; load them with bindweave.model.batch.fit_reference."
            )

    def reference_range(self) -> tuple[int, int | None]:
        """(fewest, most) reference images a request may give, as the conditioners declare them
        (:attr:`conditioners.base.ConditionerSpec.min_references` / ``max_references``)."""
        specs = [c.spec() for c in self.conditioners.values()]
        fewest = max([s.min_references for s in specs] or [0])
        limits = [s.max_references for s in specs if s.max_references is not None]
        return fewest, (min(limits) if limits else None)

    def check_reference_counts(self, num_references: list[int]) -> None:
        """Raise ``ValueError`` naming the conditioners that need references when a request has fewer
        than they declare."""
        fewest, most = self.reference_range()
        if fewest and num_references and min(num_references) < fewest:
            readers = ", ".join(type(c).__name__ for c in self.conditioners.values() if c.spec().min_references)
            span = f"{fewest} to {most}" if most is not None else f"at least {fewest}"
            raise ValueError(f"A request has no reference image, but this model conditions on them ({readers}); "
                             f"give {span} reference images.")

    # -- conditioning --------------------------------------------------------------------------

    def encode_features(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Encoder features of every conditioner: ``batch["features"][name]`` when the batch comes
        from a feature cache, else computed now (once); always computed now for a conditioner whose
        encoder trains."""
        cached = {name: f for name, f in batch.get("features", {}).items()
                  if name in self.conditioners and not self.conditioners[name].trains_encoder}
        missing = sorted(name for name, c in self.conditioners.items() if name not in cached and not c.trains_encoder)
        if missing and not self.vae.can_encode:  # built from a feature cache: no encoders
            raise ValueError(
                f"The batch has no cached features of {missing} and this model's VAE stand-in "
                f"({type(self.vae).__name__}) has no encoders: feed it cached shards (data: cached: true), or set "
                f"model.feature_cache to null to encode or sample."
            )
        return {name: _as_float32(cached[name]) if name in cached else c.encode(batch)
                for name, c in self.conditioners.items()}

    def condition_parts(
        self, batch: dict, features: dict[str, dict[str, torch.Tensor]], drops: list[list[bool] | None] | None = None
    ) -> list[Conditioning]:
        """Each conditioner's contribution from its features; ``drops[i]`` is conditioner i's
        per-sample condition dropout (None: keep every sample)."""
        drops = drops or [None] * len(self.conditioners)
        return [c.condition(batch, features[name], drop) for (name, c), drop in zip(self.conditioners.items(), drops)]

    def encode_conditions(self, batch: dict, drops: list[list[bool] | None] | None = None) -> Conditioning:
        """The batch's conditioning (encoders run once); ``drops`` as in :meth:`condition_parts`."""
        return merge(self.condition_parts(batch, self.encode_features(batch), drops))

    def null_conditions(
        self, batch: dict, features: dict[str, dict[str, torch.Tensor]], parts: list[Conditioning]
    ) -> Conditioning:
        """The unconditional side of CFG from the same features: guided conditioners give their null
        condition, the others (``guided=False``, e.g. the reference slots) are reused as they are.
        No encoder runs again."""
        drop = [True] * len(batch["prompt"])
        return merge([
            c.condition(batch, features[name], drop) if c.guided else part
            for (name, c), part in zip(self.conditioners.items(), parts)
        ])

    def context(self, cond: Conditioning) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The DiT's cross-attention inputs: tokens per branch and (unless padding is attended) masks."""
        tokens = {name: t.tokens for name, t in cond.context.items()}
        masks = {name: t.mask for name, t in cond.context.items()} if self.mask_context_padding else None
        return tokens, masks

    # -- the DiT call --------------------------------------------------------------------------

    def assemble_input(self, noisy: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[noisy latent ; empty slots] over time (slots after the video, or before it with
        ``cond.slot_placement == "before"``), [noisy | slot channels] over channels; the video
        frames' slot channels are ``cond.video_slots`` (zeros when None).

        noisy (B, z, T, h, w) -> DiT input (B, z + C_slot, T + N, h, w) and frame mask (B, T + N) or None.
        """
        if cond.slots is None:
            return noisy, None
        b, z, t, h, w = noisy.shape
        slots = cond.slots.to(noisy.dtype)  # (B, C_slot, N, h, w)
        if slots.shape[-2:] != (h, w):
            raise ValueError(
                f"Reference latents are {tuple(slots.shape[-2:])} but the video latent is {(h, w)}: "
                f"references must be resized to the video size before encoding."
            )
        c_slot, n = slots.shape[1], slots.shape[2]
        video_slots = noisy.new_zeros(b, c_slot, t, h, w) if cond.video_slots is None else cond.video_slots.to(noisy)
        video_part = torch.cat([noisy, video_slots], dim=1)  # (B, z+C, T, h, w)
        slot_part = torch.cat([noisy.new_zeros(b, z, n, h, w), slots], dim=1)  # (B, z+C, N, h, w)
        before = cond.slot_placement == "before"
        x = torch.cat([slot_part, video_part] if before else [video_part, slot_part], dim=2)  # (B, z+C, T+N, h, w)
        frame_mask = None
        if cond.slot_mask is not None:
            video_mask = cond.slot_mask.new_ones(b, t)
            frame_mask = torch.cat([cond.slot_mask, video_mask] if before else [video_mask, cond.slot_mask], dim=1)
        return x, frame_mask  # frame_mask: (B, T+N)

    @staticmethod
    def video_frames(output: torch.Tensor, num_frames: int, cond: Conditioning) -> torch.Tensor:
        """The video latent's frames of a DiT output (B, z, T+N, h, w) -> (B, z, T, h, w): the
        reference slots' outputs are dropped, wherever ``cond`` placed them."""
        if cond.slots is not None and cond.slot_placement == "before":
            return output[:, :, output.shape[2] - num_frames:]
        return output[:, :, :num_frames]

    def video_output(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One DiT call on x_σ (B, z, T, h, w) at σ (B,) under ``cond``, without classifier-free
        guidance; its output on the video latent (B, z, T, h, w): the reference slots are dropped."""
        x, frame_mask = self.assemble_input(noisy, cond)  # (B, C_in, T+N, h, w)
        context, context_mask = self.context(cond)
        output = self.dit(x, sigmas * 1000, context, context_mask, frame_mask)  # (B, z, T+N, h, w)
        return self.video_frames(output, noisy.shape[2], cond)

    def output_velocity(self, output: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The velocity (float32) from the DiT's output on the video latent: the output itself, or
        (x_σ − x̂₀)/σ for ``prediction="sample"``. output, noisy: (B, z, T, h, w); sigmas: (B,)."""
        if self.prediction == "sample":
            return velocity_from_sample(noisy, output, sigmas)
        return output.float()

    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's velocity (B, z, T, h, w) float32 at x_σ and σ (B,) under ``cond``."""
        return self.output_velocity(self.video_output(noisy, sigmas, cond), noisy, sigmas)
