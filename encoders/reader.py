"""A small *trainable* encoder reading the prompt's words and the cropped references together.

The frozen random towers of a from-scratch model (the sprites config's tiny Qwen2.5-VL, umt5 and
CLIP) pass the references on in a form the DiT barely reads (issue #21: a reader recovers a
sprite's shape from frozen random CLIP tokens with 0.34 accuracy, from the reference cropped to its
subject 1.00), and a random MLLM cannot bind "the second subject" to reference 2. This encoder
takes the MLLM's role at a size that trains in minutes: one interleaved sequence

    [<s>, prompt words ... ; reference 1 patches ; reference 2 patches ; ...]

with a learned embedding per word, per word position, per patch position and per *reference
index* (so "second" can attend to the patches of reference 2), read by a few pre-norm
transformer layers. Its output tokens feed a DiT cross-attention branch through
:class:`conditioners.reader.ReaderConditioner`, which trains it with the DiT (its weights are in
checkpoints and exports, unlike a :class:`~encoders.base.FrozenEncoder`'s).

It has two halves, like a conditioner: :meth:`PromptReferenceReader.prepare` (no weights:
tokenize, crop the references to their subject and resize them; what a feature cache may store)
and :meth:`PromptReferenceReader.forward` (the trainable part).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from bindweave.data.reference_crop import crop_to_subject
from bindweave.host_copy import host_values
from bindweave.model.attention import attention
from encoders.base import Tokens

PAD, BOS, UNK = 0, 1, 2
"""Token ids of padding, the start token (always present: the null prompt is ``<s>`` alone) and unknown words."""


class WordTokenizer:
    """Lower-cased words and punctuation marks, each one token from a fixed vocabulary.

    Args:
        vocabulary: the known words (and marks such as ``,``); others become ``<unk>``.
        max_length: most tokens per prompt, ``<s>`` included; longer prompts are cut.
        fixed_length: pad every batch to ``max_length`` (one shape for every batch: compiled
            kernels and attention plans are reused) instead of to its longest prompt.
    """

    PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, vocabulary: list[str], max_length: int = 64, fixed_length: bool = False) -> None:
        words = [w.lower() for w in vocabulary]
        if len(set(words)) != len(words):
            raise ValueError("The reader's vocabulary lists a word twice.")
        self.ids = {word: i + 3 for i, word in enumerate(words)}
        self.size = len(words) + 3
        self.max_length, self.fixed_length = max_length, fixed_length

    def words(self, prompt: str) -> list[str]:
        return self.PATTERN.findall(prompt.lower())

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) long and mask (B, L) bool, L the longest prompt's length or, with
        ``fixed_length``, ``max_length`` (``<s>`` first)."""
        rows = [[BOS] + [self.ids.get(w, UNK) for w in self.words(p)] for p in prompts]
        rows = [r[: self.max_length] for r in rows]
        length = self.max_length if self.fixed_length else max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD


class _Block(nn.Module):
    """Pre-norm self-attention + MLP over (B, L, D) with a key padding mask."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # 1. Self-attention
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)  # (B, L, H, Dh)
        x = x + self.out(attention(q, k, v, mask).reshape(b, n, d))  # (B, L, D)
        # 2. Feed-forward
        return x + self.ffn(self.norm2(x))  # (B, L, D)


class PromptReferenceReader(nn.Module):
    """Trainable joint reader of prompt words and cropped reference images (see the module docs).

    Args:
        vocabulary: words of the prompts' grammar (:class:`WordTokenizer`); for the sprites prompts
            see ``configs/sprites.yaml``.
        dim: token width (the fed DiT branch's ``context_dim``).
        num_layers: transformer layers.
        num_heads: attention heads.
        ffn_dim: MLP width (default 4 × dim).
        max_words: most prompt tokens read (``<s>`` included).
        fixed_length: pad every batch's prompts to ``max_words`` tokens (masked), so every training
            batch has one shape: compiled DiT blocks and cuDNN attention plans are built once instead
            of per prompt length. The outputs are those of the unpadded batch (padding is masked).
        read_prompt: read the prompt (False: references only, the CLIP role).
        read_references: read the references (False: the prompt only, the T5 role).
        max_references: most references read (the reference-index embeddings).
        crop: crop each reference to its subject (non-white bounding box) and pad it to a square
            before resizing (:func:`bindweave.data.reference_crop.crop_to_subject`); False resizes
            the whole image.
        crop_size: side of the resized reference, in pixels.
        patch_size: side of a reference patch (one token), in pixels.
        crop_threshold: how far from white (in [-1, 1], any channel) a pixel is subject.
    """

    def __init__(
        self,
        vocabulary: list[str],
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        max_words: int = 64,
        fixed_length: bool = False,
        read_prompt: bool = True,
        read_references: bool = True,
        max_references: int = 4,
        crop: bool = True,
        crop_size: int = 16,
        patch_size: int = 4,
        crop_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        if not (read_prompt or read_references):
            raise ValueError("PromptReferenceReader must read the prompt, the references or both.")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads}).")
        if crop_size % patch_size:
            raise ValueError(f"crop_size ({crop_size}) must be a multiple of patch_size ({patch_size}).")
        self.tokenizer = WordTokenizer(vocabulary, max_words, fixed_length)
        self.dim, self.read_prompt, self.read_references = dim, read_prompt, read_references
        self.max_references, self.crop, self.crop_size, self.patch_size = max_references, crop, crop_size, patch_size
        self.crop_threshold = crop_threshold
        patches = (crop_size // patch_size) ** 2
        # Embeddings: words and their positions; patches, their positions and their reference's index.
        self.word_embedding = nn.Embedding(self.tokenizer.size, dim) if read_prompt else None
        self.word_position = nn.Parameter(torch.zeros(max_words, dim)) if read_prompt else None
        self.patch_embedding = nn.Linear(3 * patch_size**2, dim) if read_references else None
        self.patch_position = nn.Parameter(torch.zeros(patches, dim)) if read_references else None
        self.reference_index = nn.Parameter(torch.zeros(max_references, dim)) if read_references else None
        self.blocks = nn.ModuleList(_Block(dim, num_heads, ffn_dim or 4 * dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Small normal embeddings, Xavier projections, zero biases."""
        for p in (self.word_position, self.patch_position, self.reference_index):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        if self.word_embedding is not None:
            nn.init.normal_(self.word_embedding.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def hidden_size(self) -> int:
        """Width of the output tokens."""
        return self.dim

    @torch.no_grad()
    def prepare(self, prompts: list[str], references: torch.Tensor | None, reference_mask: torch.Tensor | None) -> dict:
        """What the trainable part reads, with no weights involved (a feature cache may store it).

        Args:
            prompts: B prompts.
            references: (B, N, 3, H, W) in [-1, 1] (zero padding past each sample's count), or None.
            reference_mask: (B, N) bool, True for real references.

        Returns:
            ``ids`` (B, L) long and ``id_mask`` (B, L) bool (with ``read_prompt``); ``crops``
            (B, N', 3, c, c) and ``crop_mask`` (B, N') bool, N' = min(N, max_references) (with
            ``read_references``).
        """
        features: dict[str, torch.Tensor] = {}
        device = references.device if references is not None else self.norm.weight.device
        if self.read_prompt:
            ids, mask = self.tokenizer(list(prompts))
            features.update(ids=host_values(ids, device, torch.long), id_mask=host_values(mask, device, torch.bool))
        if self.read_references:
            b = len(prompts)
            if references is None or references.shape[1] == 0:
                c = self.crop_size
                features.update(crops=torch.zeros(b, 0, 3, c, c, device=device),
                                crop_mask=torch.zeros(b, 0, dtype=torch.bool, device=device))
                return features
            references, reference_mask = references[:, : self.max_references], reference_mask[:, : self.max_references]
            flat = references.flatten(0, 1).float()  # (B·N, 3, H, W)
            if self.crop:
                crops = crop_to_subject(flat, self.crop_size, threshold=self.crop_threshold)  # (B·N, 3, c, c)
            else:
                crops = nn.functional.interpolate(flat, size=(self.crop_size,) * 2, mode="area")
            features.update(crops=crops.unflatten(0, references.shape[:2]), crop_mask=reference_mask)
        return features

    def forward(self, features: dict) -> Tokens:
        """Tokens (B, L + N'·P, dim) and their mask from :meth:`prepare`'s features."""
        parts, masks = [], []
        if self.read_prompt:
            ids = features["ids"][:, : self.word_position.shape[0]]  # (B, L)
            words = self.word_embedding(ids) + self.word_position[: ids.shape[1]]  # (B, L, D)
            parts.append(words)
            masks.append(features["id_mask"][:, : ids.shape[1]])
        if self.read_references:
            crops = features["crops"]  # (B, N, 3, c, c)
            b, n = crops.shape[:2]
            p, g = self.patch_size, self.crop_size // self.patch_size
            patches = crops.reshape(b, n, 3, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, N, g, g, 3, p, p)
            patches = patches.reshape(b, n, g * g, 3 * p * p).to(self.patch_embedding.weight.dtype)  # (B, N, P, 3p²)
            tokens = self.patch_embedding(patches) + self.patch_position  # (B, N, P, D)
            tokens = tokens + self.reference_index[:n, None]  # (B, N, P, D)
            parts.append(tokens.reshape(b, n * g * g, self.dim))  # (B, N·P, D)
            masks.append(features["crop_mask"].repeat_interleave(g * g, dim=1))  # (B, N·P)
        x, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)  # (B, L', D), (B, L')
        for block in self.blocks:
            x = block(x, mask)
        return Tokens(self.norm(x), mask)

