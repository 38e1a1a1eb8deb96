"""Shared base of the pretrained backbones: dtype handling, freezing (or training) and the token output contract."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from bindweave.dtypes import resolve_dtype  # noqa: F401  (re-exported: encoders.resolve_dtype)
from bindweave.errors import UserError


@contextmanager
def _seeded_cpu(seed: int, device: str) -> Iterator[None]:
    """Build on ``device`` with the CPU generator at ``seed``; the global CPU generator is restored after."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.random.default_generator.manual_seed(seed)
        yield


def check_video(video: torch.Tensor, temporal: int, spatial: int) -> None:
    """Raise a ValueError naming the fix unless ``video`` is (B, 3, 1 + temporal·k, H, W) with H and
    W multiples of ``spatial``: what a video VAE with those compressions can encode."""
    if video.ndim != 5:
        raise ValueError(
            f"video must be 5-D (B, 3, F, H, W) in [-1, 1], got shape {tuple(video.shape)}; "
            "for single images (M, 3, H, W) use encode_images."
        )
    if video.shape[1] != 3:
        raise ValueError(
            f"video must have 3 RGB channels in dim 1 (B, 3, F, H, W), got {video.shape[1]} "
            f"(shape {tuple(video.shape)}); a (B, F, 3, H, W) video needs .transpose(1, 2)."
        )
    frames, height, width = video.shape[2:]
    if (frames - 1) % temporal != 0:
        lower = 1 + max(frames - 1, 0) // temporal * temporal
        raise ValueError(
            f"The VAE encodes 1 + {temporal}k frames, got {frames}: use {lower} or {lower + temporal} frames."
        )
    if height % spatial != 0 or width % spatial != 0:
        s = spatial
        raise ValueError(
            f"Frame size {height}x{width} is not a multiple of {s}: resize or crop to "
            f"{height // s * s}x{width // s * s} (or {-(-height // s) * s}x{-(-width // s) * s})."
        )


@dataclass
class Tokens:
    """A padded token sequence: ``tokens`` (B, L, D) and ``mask`` (B, L) bool, True = real token."""

    tokens: torch.Tensor
    mask: torch.Tensor


class FrozenEncoder(nn.Module):
    """A pretrained backbone (T5, CLIP, the MLLM, the VAE): frozen unless the model trains it.

    Frozen (the default), its weights never change and it stays in eval mode whatever Lightning
    asks; checkpoints and exports leave its weights out (they come from its own files). A model
    that lists it in ``train_encoders`` calls :meth:`unfreeze`: it then trains with the rest (its
    own learning rate through ``lr_multipliers``), follows train/eval mode, and its trained weights
    go into checkpoints and exports, loaded over the pretrained ones.

    Subclasses build their network either from a local pretrained folder/file or from a tiny
    random-weight config (tests, ``configs/tiny.yaml``), call :meth:`freeze` at the end of
    ``__init__``, and expose a ``tiny()`` classmethod returning a small random instance for the
    shared contract tests.

    Args:
        dtype: dtype of the weights and of the computation ("float32", "bfloat16", "float16");
            kept whatever precision the trainer casts the rest of the model to. A trained encoder's
            weights are its optimizer's master weights: float32 under a mixed-precision trainer.
    """

    #: Device on which random (``tiny_config``) weights are drawn. The CPU by default, so that the
    #: same frozen encoders come out whether a run builds them on a GPU (Lightning's init context)
    #: or on a CPU: a model trained on a GPU (or from a feature cache) then samples with the same
    #: random encoders anywhere. None draws them on the current default device, unseeded
    #: (benchmarks, where only speed matters).
    random_init_device: str | None = "cpu"

    #: Seed of the CPU generator while random weights are drawn (see ``random_init``).
    random_init_seed: int = 0

    #: Whether a model may train it (:meth:`unfreeze`). False for the VAE: it encodes the targets.
    can_train: bool = True

    def __init__(self, dtype: str = "bfloat16") -> None:
        super().__init__()
        self.dtype = resolve_dtype(dtype)
        self.trainable = False

    @classmethod
    def random_init(cls) -> AbstractContextManager:
        """Context in which to build random-weight (``tiny_config``) networks: on
        ``random_init_device`` from the CPU generator seeded with ``random_init_seed``, the global
        generator restored after. An encoder's random weights then depend on its config alone, not on
        what was drawn before it: the trainable parts built beside it draw from the GPU's generator
        under Lightning's init context and from the CPU's elsewhere, which shifted the CPU stream (a
        GPU ``predict`` built another CLIP tower than the feature cache it was trained on)."""
        if not cls.random_init_device:
            return nullcontext()
        return _seeded_cpu(cls.random_init_seed, cls.random_init_device)

    def freeze(self) -> "FrozenEncoder":
        """Cast to the configured dtype, disable gradients and switch to eval mode."""
        self.to(self.dtype)
        self.requires_grad_(False)
        self.trainable = False
        return super().train(False)

    def unfreeze(self) -> "FrozenEncoder":
        """Train this encoder: gradients on, train/eval mode as the model's (``model.train_encoders``)."""
        if not self.can_train:
            raise UserError(f"{type(self).__name__} cannot be trained: the flow loss compares its outputs; leave it out "
                            "of model.train_encoders.")
        self.trainable = True
        self.requires_grad_(True)
        return self

    def checkpoint_activations(self) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them (a trained
        encoder under ``parallelism.activation_checkpointing``), through its library's own switch.
        Subclasses with such a switch override it; the default says there is none."""
        raise UserError(f"{type(self).__name__} has no activation checkpointing switch; train it without "
                        "parallelism.activation_checkpointing, or add one to the class.")

    def _apply(self, fn, recurse: bool = True):
        """Keep the configured dtype when a whole model is cast (e.g. Lightning's ``bf16-true``
        precision casts every module): a frozen encoder's precision is part of its config."""
        module = super()._apply(fn, recurse)
        for tensor in list(self.parameters()) + list(self.buffers()):
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor.data = tensor.data.to(self.dtype)
        return module

    def train(self, mode: bool = True) -> "FrozenEncoder":
        """Frozen encoders stay in eval mode whatever Lightning asks (no dropout, fixed norms); a
        trained one follows ``mode``."""
        return super().train(mode and self.trainable)

    def check_source(self, pretrained_path: str | None, tiny_config: dict | None, pretrained_what: str) -> None:
        """Raise unless exactly one of ``pretrained_path`` / ``tiny_config`` is given.

        ``pretrained_what`` says what the path should point at (e.g. "a local VLM folder")."""
        if (pretrained_path is None) == (tiny_config is None):
            raise ValueError(
                f"{type(self).__name__} needs exactly one of `pretrained_path` ({pretrained_what}) or "
                f"`tiny_config` (random weights); got pretrained_path={pretrained_path!r} and "
                f"tiny_config={'set' if tiny_config is not None else None}."
            )

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")


@runtime_checkable
class VideoAutoencoder(Protocol):
    """What the model asks of its VAE (``encoders.WanVAE``, ``encoders.PatchVAE``, or the
    ``LatentSpace`` stand-in of a model that trains from a feature cache).

    Attributes:
        latent_channels: z.
        temporal_compression: frames per latent frame after the first.
        spatial_compression: pixels per latent pixel along H and W.
        can_encode: False for a stand-in without networks (``encode``/``decode`` raise).
    """

    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    can_encode: bool

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> (B, z, T, h, w) normalised latents."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [-1, 1] -> (M, z, 1, h, w) normalised latents."""

    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """(B, z, T, h, w) normalised latents -> (B, 3, F, H, W) in [-1, 1]; ``tiled`` decodes in
        overlapping spatial tiles, or raises ``ValueError`` where the VAE has no tiling."""


def pretrained_encoders(module: nn.Module) -> list[FrozenEncoder]:
    """The outermost :class:`FrozenEncoder` submodules of ``module`` (the VAE included), frozen or
    trained: what sampling may offload."""
    found: list[FrozenEncoder] = []

    def walk(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, FrozenEncoder):
                found.append(child)
            else:
                walk(child)

    walk(module)
    return found


def frozen_encoders(module: nn.Module) -> list[FrozenEncoder]:
    """The outermost :class:`FrozenEncoder` submodules of ``module`` that stay frozen (not trained)."""
    return [encoder for encoder in pretrained_encoders(module) if not encoder.trainable]


def frozen_prefixes(module: nn.Module) -> list[str]:
    """State-dict key prefixes (``"vae."``, ``"conditioners.identity.image_encoder."``) of the frozen
    :class:`FrozenEncoder` submodules of ``module``: the weights that checkpoints and exports leave
    out (a trained encoder's are kept)."""
    return _encoder_prefixes(module, trained=False)


def trained_prefixes(module: nn.Module) -> list[str]:
    """State-dict key prefixes of the :class:`FrozenEncoder` submodules of ``module`` that train."""
    return _encoder_prefixes(module, trained=True)


def _encoder_prefixes(module: nn.Module, trained: bool) -> list[str]:
    return [name + "." for name, m in module.named_modules()
            if isinstance(m, FrozenEncoder) and name and m.trainable == trained]


def checkpoint_transformers_layers(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every layer of a transformers model, through the
    method its version has (``activation_checkpointing_enable`` replaced ``gradient_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
