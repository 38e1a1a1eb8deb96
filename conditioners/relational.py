"""BindWeave's relational condition: MLLM hidden states through a connector, joined to T5 tokens."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from conditioners.base import Conditioner, ConditionerSpec, Conditioning, concat_tokens, pad_tokens
from conditioners.references import reference_mask
from encoders.base import Tokens
from encoders.mllm import MLLMEncoder
from encoders.text import T5TextEncoder


_NOT_NEEDED = object()
"""A negative row's MLLM states that nobody reads (the sample keeps the null condition): no MLLM call."""


def _replace_rows(tokens: torch.Tensor, mask: torch.Tensor, new_tokens: torch.Tensor, new_mask: torch.Tensor,
                  rows: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i with rows[i] take row i of the (B, L', C) replacement (row 0 when it has one row);
    both are padded to a common length."""
    length = max(tokens.shape[1], new_tokens.shape[1])
    tokens = nn.functional.pad(tokens, (0, 0, 0, length - tokens.shape[1]))  # (B, L, C)
    mask = nn.functional.pad(mask, (0, length - mask.shape[1]), value=False)  # (B, L)
    new_tokens = nn.functional.pad(new_tokens, (0, 0, 0, length - new_tokens.shape[1])).to(tokens)
    new_mask = nn.functional.pad(new_mask, (0, length - new_mask.shape[1]), value=False)
    tokens, mask = tokens.clone(), mask.clone()
    for i, replace in enumerate(rows):
        if replace:
            j = i if new_tokens.shape[0] > 1 else 0
            tokens[i], mask[i] = new_tokens[j], new_mask[j]
    return tokens, mask


def _zero_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)


class RelationalConditioner(Conditioner):
    """Prompt + references read jointly by an MLLM, plus the prompt's T5 tokens, for one branch.

    The MLLM reads one interleaved sequence (the prompt followed by an image placeholder per
    reference); its last hidden states go through a trainable 2-layer MLP + GELU *connector* to the
    T5 width and are concatenated before the T5 tokens: ``[connector(mllm); t5]`` (B, L_m + L_t, C_t).
    With ``mllm`` left out this is the paper's T5-only ablation.

    The connector's output layer is zero-initialised: at step 0 the MLLM tokens are all equal
    constants, so they carry no information yet (they still take part in the attention softmax, so
    a concatenated branch is not bit-identical to T5 alone).

    The null condition (CFG's unconditional side, condition dropout) is ``null_prompt`` read
    without images; its features are computed once and kept (or set from a feature cache with
    :meth:`set_null_features`).

    A *negative prompt* replaces the null condition of the samples that have one: the batch's
    ``negative_prompt`` (list[str | None], None = this conditioner's ``negative_prompt``; issue #24's
    requests carry it), else ``negative_prompt`` here. Its T5 and MLLM features are computed in
    :meth:`encode` with the prompt's; with ``negative_references`` the MLLM reads it with the sample's
    reference images (the released BindWeave's negative MLLM states), else without. Samples with no
    negative prompt keep the null condition.

    *Precomputed MLLM states*: a batch's ``mllm_states`` / ``negative_mllm_states`` (lists with one
    (L, C_m) tensor or None per sample; :mod:`bindweave.inference.mllm_states` reads the release's
    ``.pt`` files and this project's feature cache) replace the MLLM's output for the samples that
    have them; a sample with ``negative_mllm_states`` is a negative row even without a negative
    prompt (its T5 side then reads ``null_prompt``). With ``mllm_width`` and no ``mllm``, no MLLM is
    loaded at all and every request must bring its states (as the official inference runs).

    Args:
        text_encoder: factory of the T5/UMT5 encoder.
        mllm: factory of the MLLM encoder; None switches the MLLM path off (unless ``mllm_width``).
        mllm_width: with ``mllm`` None, the width of precomputed MLLM states (3584 for
            Qwen2.5-VL-7B): the connector is built for it and no MLLM is loaded; requests must carry
            ``mllm_states`` (and, where CFG needs the MLLM side, ``negative_mllm_states``).
        branch: DiT cross-attention branch fed.
        null_prompt: prompt of the null condition.
        release_connector_path: the released BindWeave DiT checkpoint (file or sharded folder) to
            initialise the connector from (its ``text_projector``), instead of zeros.
        attend_t5_padding: the T5 tokens past the prompt (zeros up to the encoder's ``max_length``)
            count as real tokens and are attended, as the released BindWeave does (T5 zero-padded to
            512, no attention mask); False masks them (paper). Padding made by batching is masked
            either way, so a request gives the same output alone or batched (and CFG's two sides stay
            apart).
        negative_prompt: default negative prompt of CFG's unconditional side (see above); None: the
            null condition, unless the batch gives one.
        negative_references: the MLLM reads the negative prompt with the sample's references.
        dropout: see :class:`Conditioner`.
        guided: see :class:`Conditioner`.
    """

    def __init__(
        self,
        text_encoder: Callable[[], T5TextEncoder],
        mllm: Callable[[], MLLMEncoder] | None = None,
        mllm_width: int | None = None,
        branch: str = "text",
        null_prompt: str = "",
        release_connector_path: str | None = None,
        attend_t5_padding: bool = False,
        negative_prompt: str | None = None,
        negative_references: bool = False,
        dropout: float = 0.1,
        guided: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, guided=guided)
        self.attend_t5_padding = attend_t5_padding
        self.negative_prompt = negative_prompt
        self.negative_references = negative_references
        if release_connector_path is not None and mllm is None and mllm_width is None:
            raise ValueError("release_connector_path needs an `mllm` (or `mllm_width` for precomputed states): the "
                             "connector projects MLLM hidden states.")
        if mllm is not None and mllm_width is not None:
            raise ValueError("Give `mllm` (its width is read from the model) or `mllm_width` (precomputed states, no "
                             "MLLM loaded), not both.")
        self.mllm_width = mllm_width
        self.release_connector_path = release_connector_path
        self.text_encoder_factory = text_encoder
        self.mllm_factory = mllm
        self.branch = branch
        self.null_prompt = null_prompt
        self.text_encoder: T5TextEncoder | None = None
        self.mllm: MLLMEncoder | None = None
        self.connector: nn.Sequential | None = None
        self.null_features: dict[str, torch.Tensor] | None = None
        self.width: int | None = None

    def build(self, vae: nn.Module) -> None:
        """Build the encoders and the connector, whose sizes come from the encoders' configs."""
        text_encoder = self.text_encoder_factory()
        mllm = self.mllm_factory() if self.mllm_factory is not None else None
        self._build_connector(text_encoder.hidden_size, mllm.hidden_size if mllm is not None else self.mllm_width)
        self.mllm = mllm
        self.text_encoder = text_encoder

    def _build_connector(self, width: int, mllm_width: int | None) -> None:
        self.width = width
        if mllm_width is not None:
            self.connector = nn.Sequential(nn.Linear(mllm_width, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
            # Through apply: DeepSpeed ZeRO-3 partitions a module as it is built and gathers it for apply.
            self.connector[2].apply(_zero_linear)
            if self.release_connector_path is not None:
                from bindweave.weights.bindweave_release import load_release_connector

                load_release_connector(self.connector, self.release_connector_path)

    def cached_state(self) -> dict[str, torch.Tensor]:
        """The T5 (and MLLM) widths and the null condition's features."""
        state = {"width": torch.tensor(self.width)}
        if self.connector is not None:
            state["mllm_width"] = torch.tensor(self.connector[0].in_features)
        state.update({f"null.{key}": value for key, value in self._null().items()})
        return state

    def build_cached(self, vae: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """The connector only (no encoder); the null condition comes from the cache. A cache made
        with an MLLM also serves a conditioner without one (its MLLM features are ignored: the
        T5-only ablations train from the full model's cache)."""
        mllm_width = int(state["mllm_width"]) if "mllm_width" in state else None
        if mllm_width is None and self.has_mllm:
            raise ValueError(
                "The feature cache was made without an MLLM but this RelationalConditioner has one; re-run "
                "`bindweave data cache` with this model config."
            )
        if not self.has_mllm:
            mllm_width = None
            state = {key: value for key, value in state.items() if "mllm" not in key}
        self._build_connector(int(state["width"]), mllm_width)
        self.set_null_features({key[5:]: value for key, value in state.items() if key.startswith("null.")})

    @property
    def has_mllm(self) -> bool:
        """Whether the MLLM path is on (an MLLM, or precomputed states of ``mllm_width``)."""
        return self.mllm_factory is not None or self.mllm_width is not None

    def spec(self) -> ConditionerSpec:
        return ConditionerSpec(branches={self.branch: self.width})

    @property
    def encode_inputs(self) -> frozenset[str]:
        """The prompts (and precomputed MLLM states); the reference images too when an MLLM reads them."""
        texts = {"prompt", "negative_prompt", "mllm_states", "negative_mllm_states"}
        return frozenset(texts | ({"references"} if self.mllm is not None else set()))

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.encoding():
            return self._encode(batch)

    def _encode(self, batch: dict) -> dict[str, torch.Tensor]:
        features = self._encode_texts(batch, list(batch["prompt"]), True, batch.get("mllm_states"))
        negatives = self.negative_prompts(batch)
        given = batch.get("negative_mllm_states") or [None] * len(negatives)
        rows = [text is not None or states is not None for text, states in zip(negatives, given)]
        if any(rows):  # samples without one keep the null condition
            texts = [text if text is not None else self.null_prompt for text in negatives]
            states = [s if s is not None else None if row else _NOT_NEEDED for s, row in zip(given, rows)]
            negative = self._encode_texts(batch, texts, self.negative_references, states)
            features.update({f"negative_{key}": value for key, value in negative.items()})
            features["negative_rows"] = torch.tensor(rows)
        return features

    def negative_prompts(self, batch: dict) -> list[str | None]:
        """Each sample's negative prompt: ``batch["negative_prompt"][i]``, else ``negative_prompt``."""
        given = batch.get("negative_prompt") or [None] * len(batch["prompt"])
        return [text if text is not None else self.negative_prompt for text in given]

    def _encode_texts(self, batch: dict, texts: list[str], with_references: bool,
                      states: list | None = None) -> dict[str, torch.Tensor]:
        """T5 and MLLM features of one text per sample: the MLLM reads the text (with the batch's
        references when asked) for the samples without precomputed ``states``."""
        t5 = self.text_encoder(texts)  # (B, L_t, C_t)
        features = {"t5_tokens": t5.tokens, "t5_mask": t5.mask}
        if not self.has_mllm:
            return features
        states = list(states) if states is not None else [None] * len(texts)
        if self.mllm is None and any(s is None for s in states):
            raise ValueError("this model has no MLLM (relational mllm_width: precomputed states only) and a request "
                             "brings no MLLM states; give the request `mllm_states` and `negative_mllm_states` files.")
        if self.mllm is not None and any(s is None for s in states):
            images = batch.get("references") if with_references else None
            mask = reference_mask(batch) if images is not None and images.shape[1] else None
            hidden = self.mllm(texts, images if mask is not None else None, mask)  # (B, L_m, C_m)
            if all(s is None or s is _NOT_NEEDED for s in states):  # nothing precomputed: as the MLLM pads
                features.update(mllm_tokens=hidden.tokens, mllm_mask=hidden.mask)
                return features
            states = [hidden.tokens[i, hidden.mask[i]] if s is None else s for i, s in enumerate(states)]
        states = [s if s is not _NOT_NEEDED else t5.tokens.new_zeros(0, self.connector[0].in_features) for s in states]
        width = self.connector[0].in_features
        for s in states:
            if s.ndim != 2 or s.shape[1] != width:
                raise ValueError(f"precomputed MLLM states of shape {tuple(s.shape)}, but the connector reads (L, {width}) "
                                 f"states; give states of this model's MLLM (or set relational mllm_width).")
        tokens = pad_tokens([Tokens(s[None].to(t5.tokens.device, torch.float32), torch.ones(1, len(s), dtype=torch.bool,
                                                                                           device=t5.tokens.device))
                             for s in states])
        features.update(mllm_tokens=tokens.tokens, mllm_mask=tokens.mask)  # (B, L_m, C_m), (B, L_m)
        return features

    def set_null_features(self, features: dict[str, torch.Tensor]) -> None:
        """Use these (1, L, C) features for the null condition (e.g. read from a feature cache)."""
        self.null_features = features

    def _null(self) -> dict[str, torch.Tensor]:
        """The null condition's features: computed once, or at every call while an encoder trains."""
        trains = self.trains_encoder
        if self.null_features is not None and not trains:
            return self.null_features
        if self.has_mllm and self.mllm is None:
            raise ValueError("the null condition needs the MLLM, which this model does not load (relational "
                             "mllm_width); give every request `negative_mllm_states` (or a negative prompt).")
        with self.encoding():
            features = self._encode_texts({}, [self.null_prompt], with_references=False)
        if not trains:
            self.null_features = features
        return features

    def condition(self, batch: dict, features: dict[str, torch.Tensor], drop: list[bool] | None = None) -> Conditioning:
        t5_tokens, t5_mask = features["t5_tokens"], features["t5_mask"]
        has_mllm = self.connector is not None
        mllm_tokens, mllm_mask = (features["mllm_tokens"], features["mllm_mask"]) if has_mllm else (None, None)
        if drop is not None and any(drop):
            negative = features["negative_rows"].tolist() if "negative_rows" in features else [False] * len(drop)
            for source, rows in ((self._null, [d and not n for d, n in zip(drop, negative)]),
                                 (lambda: {k[9:]: v for k, v in features.items() if k.startswith("negative_")},
                                  [d and n for d, n in zip(drop, negative)])):
                if not any(rows):
                    continue
                source = source()
                t5_tokens, t5_mask = _replace_rows(t5_tokens, t5_mask, source["t5_tokens"], source["t5_mask"], rows)
                if has_mllm:
                    mllm_tokens, mllm_mask = _replace_rows(
                        mllm_tokens, mllm_mask, source["mllm_tokens"], source["mllm_mask"], rows)
        if self.attend_t5_padding:  # the release attends T5's zero padding
            t5_mask = torch.ones_like(t5_mask)
        t5 = Tokens(t5_tokens, t5_mask)
        if not has_mllm:
            return Conditioning(context={self.branch: t5})
        weight = self.connector[0].weight
        projected = self.connector(mllm_tokens.to(weight.dtype))  # (B, L_m, C_t)
        return Conditioning(context={self.branch: concat_tokens([Tokens(projected.to(t5_tokens.dtype), mllm_mask), t5])})

