"""Frozen encoders: the shared contract, output shapes and masks, and loading back from local files."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers

import encoders
from encoders import CLIPVisionEncoder, FrozenEncoder, MLLMEncoder, PatchVAE, T5TextEncoder, WanVAE
from encoders.clip import TINY_CLIP_CONFIG
from encoders.tokenizer import QWEN2_VL_SPECIAL_TOKENS, byte_level_tokenizer, qwen2_tokenizer
from tests.tiny_parts import tiny


def _concrete_subclasses(cls: type) -> list[type]:
    """Every subclass the project defines (test doubles defined in tests are left out)."""
    found = []
    for sub in cls.__subclasses__():
        if not sub.__module__.startswith("tests"):
            found.append(sub)
        found.extend(_concrete_subclasses(sub))
    return sorted(set(found), key=lambda c: c.__qualname__)


ENCODERS = _concrete_subclasses(FrozenEncoder)
# Pretrained backbones (weights from a local path or a tiny random config); PatchVAE is fixed, weightless.
PRETRAINED = [cls for cls in ENCODERS if cls is not PatchVAE]


@pytest.fixture(scope="module")
def mllm() -> MLLMEncoder:
    return tiny(MLLMEncoder)


@pytest.fixture(scope="module")
def t5() -> T5TextEncoder:
    return tiny(T5TextEncoder)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    return tiny(WanVAE)


def _images(batch: int, refs: int, size: int = 40) -> torch.Tensor:
    return torch.rand(batch, refs, 3, size, size) * 2 - 1  # (B, N, 3, H, W) in [-1, 1]


# ---------------------------------------------------------------------------------------------
# Shared contract
# ---------------------------------------------------------------------------------------------


def test_every_encoder_is_discovered():
    assert {MLLMEncoder, T5TextEncoder, CLIPVisionEncoder, WanVAE, PatchVAE} <= set(ENCODERS)
    for cls in ENCODERS:
        assert getattr(encoders, cls.__name__) is cls, f"{cls.__name__} is not re-exported by encoders"


@pytest.mark.parametrize("cls", PRETRAINED, ids=lambda c: c.__name__)
def test_contract(cls):
    encoder = tiny(cls)
    assert isinstance(encoder, FrozenEncoder)
    params = list(encoder.parameters())
    assert params, "a tiny encoder must have weights"
    assert not any(p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    assert encoder.dtype == torch.float32
    assert encoder.device == torch.device("cpu")
    encoder.train()
    assert not any(m.training for m in encoder.modules())


@pytest.mark.parametrize("cls", PRETRAINED, ids=lambda c: c.__name__)
def test_needs_exactly_one_source(cls):
    with pytest.raises(ValueError, match="exactly one"):
        cls()
    with pytest.raises(ValueError, match="exactly one"):
        cls(pretrained_path="/nowhere", tiny_config={})


@pytest.mark.parametrize("cls", PRETRAINED, ids=lambda c: c.__name__)
def test_random_weights_do_not_depend_on_the_default_device(cls):
    """A model trained on a GPU (Lightning builds it under torch.device("cuda")) must find the same
    random frozen encoders when it samples on a CPU: they are drawn on the CPU whatever the default."""
    torch.manual_seed(0)
    plain = dict(tiny(cls).named_parameters())
    torch.manual_seed(0)
    with torch.device("meta"):  # stands in for a GPU default device
        other = dict(tiny(cls).named_parameters())
    assert plain.keys() == other.keys()
    for name, weight in other.items():
        assert weight.device.type == "cpu", name
        torch.testing.assert_close(weight, plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("cls", PRETRAINED, ids=lambda c: c.__name__)
def test_dtype_cast(cls):
    encoder = tiny(cls)
    encoder.dtype = torch.bfloat16
    encoder.freeze()
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_byte_level_tokenizer():
    tokenizer = byte_level_tokenizer(QWEN2_VL_SPECIAL_TOKENS)
    assert len(tokenizer) == 3 + 256 + len(QWEN2_VL_SPECIAL_TOKENS)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("hé<|image_pad|>")["input_ids"]
    assert ids == [3 + ord("h"), 3 + 0xC3, 3 + 0xA9, tokenizer.convert_tokens_to_ids("<|image_pad|>")]
    assert tokenizer.decode(ids) == "hé<|image_pad|>"
    assert byte_level_tokenizer(append_eos=True)("ab")["input_ids"] == [3 + 97, 3 + 98, 1]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return qwen2_tokenizer()


def test_qwen2_tokenizer_matches_qwen_ids(qwen_tokenizer):
    tokenizer = qwen_tokenizer
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                "<|video_pad|>": 151656, "<|file_sep|>": 151664}  # fmt: skip
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(tokenizer) == 151665
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    text = "A cat, 你好! 12 <|image_pad|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}], tokenize=False
    )
    assert chat.endswith("<|im_start|>user\nhi<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n")


# ---------------------------------------------------------------------------------------------
# MLLM
# ---------------------------------------------------------------------------------------------


def test_mllm_more_images_longer_sequence(mllm):
    images = _images(1, 3)
    lengths = []
    for n in range(4):
        mask = torch.arange(3)[None] < n  # (1, 3): first n references valid
        out = mllm(["a cat and a dog"], images, mask)
        assert out.tokens.shape == (1, out.mask.shape[1], mllm.hidden_size)
        assert out.mask.all()
        lengths.append(out.mask.shape[1])
    steps = [b - a for a, b in zip(lengths, lengths[1:])]
    assert steps[0] > 0 and len(set(steps)) == 1, lengths  # each 56x56 reference adds the same tokens


def test_mllm_batch_with_different_reference_counts(mllm):
    prompts = ["two refs", "no refs at all", "one"]
    images = _images(3, 2)
    mask = torch.tensor([[True, True], [False, False], [False, True]])
    out = mllm(prompts, images, mask)
    assert out.tokens.shape[:2] == out.mask.shape and out.tokens.shape[0] == 3
    assert out.mask.dtype == torch.bool
    assert (out.tokens[~out.mask] == 0).all()
    assert out.mask.sum(1).max() == out.mask.shape[1]  # padded to the longest
    for i in range(3):  # each sample alone gives its own length and the same hidden states
        alone = mllm(prompts[i : i + 1], images[i : i + 1], mask[i : i + 1])
        length = alone.mask.shape[1]
        assert out.mask[i].sum() == length and out.mask[i, :length].all()
        torch.testing.assert_close(out.tokens[i, :length], alone.tokens[0], atol=1e-4, rtol=1e-4)
    text_only = mllm(prompts[1:2])
    length = text_only.mask.shape[1]
    torch.testing.assert_close(text_only.tokens[0], out.tokens[1, :length], atol=1e-4, rtol=1e-4)


def test_mllm_sequence_follows_chat_template(mllm):
    texts = mllm._texts(["a dog"], [2])
    assert texts[0].count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert texts[0].index("a dog") < texts[0].index("<|image_pad|>")


def test_mllm_without_chat_template_and_truncation():
    mllm = tiny(MLLMEncoder)
    mllm.processor.chat_template = None
    assert mllm._texts(["a dog"], [2]) == ["a dog\n<|image_pad|>\n<|image_pad|>"]
    out = mllm(["a dog", "cat"], _images(2, 2), torch.tensor([[True, True], [True, False]]))
    assert out.mask.sum(1).tolist() == [5 + 2 * (1 + 49), 3 + 1 + 49]  # bytes + (newline + 7x7 tokens)
    mllm.max_length = 2
    assert mllm._texts(["a dog"], [1]) == ["a \n<|image_pad|>"]


def test_mllm_sequence_with_real_qwen_processor(qwen_tokenizer):
    """The Qwen2.5-VL processor (default sizes) over the offline Qwen tokenizer: 448 px -> 256 tokens."""
    mllm = tiny(MLLMEncoder)
    mllm.processor = transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(),
        video_processor=transformers.Qwen2VLVideoProcessor(),
        tokenizer=qwen_tokenizer,
        chat_template=qwen_tokenizer.chat_template,
    )
    texts = mllm._texts(["a dog", "a cat"], [2, 0])
    images = list(torch.rand(2, 3, 448, 448))
    batch = mllm.processor(text=texts, images=images, padding=True, return_tensors="pt", do_rescale=False)
    image_tokens = (batch["input_ids"] == 151655).sum(1)
    assert image_tokens.tolist() == [2 * 256, 0]
    assert batch["image_grid_thw"].tolist() == [[1, 32, 32]] * 2


def test_mllm_layer_and_input_checks(mllm):
    images, mask = _images(1, 1), torch.ones(1, 1, dtype=torch.bool)
    last = mllm(["x"], images, mask).tokens
    mllm.layer = -2
    try:
        penultimate = mllm(["x"], images, mask).tokens
    finally:
        mllm.layer = -1
    assert penultimate.shape == last.shape and not torch.allclose(penultimate, last)
    with pytest.raises(ValueError, match="images must be"):
        mllm(["x"], images[0], mask)
    with pytest.raises(ValueError, match="image_mask"):
        mllm(["x"], images, torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "model_class", ["transformers.AutoModelForImageTextToText", "transformers.AutoModel"]
)
def test_mllm_from_pretrained_path(mllm, tmp_path, model_class):
    mllm.model.save_pretrained(tmp_path)
    mllm.processor.save_pretrained(tmp_path)
    loaded = MLLMEncoder(
        pretrained_path=str(tmp_path), model_class=model_class, image_size=56, dtype="float32"
    )
    assert loaded.hidden_size == mllm.hidden_size
    images, mask = _images(2, 2), torch.tensor([[True, False], [True, True]])
    expected, actual = mllm(["a", "b c"], images, mask), loaded(["a", "b c"], images, mask)
    assert torch.equal(actual.mask, expected.mask)
    torch.testing.assert_close(actual.tokens, expected.tokens)


# ---------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------


def test_t5_fixed_length_and_zeroed_padding(t5):
    out = t5(["a cat", "x" * 100, "  two \n words  "])
    assert out.tokens.shape == (3, t5.max_length, t5.hidden_size)
    assert out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [5 + 1, t5.max_length, 9 + 1]  # bytes + </s>, truncated, cleaned
    assert (out.tokens[~out.mask] == 0).all()
    assert (out.tokens[out.mask].abs().sum(-1) > 0).all()


def test_t5_from_pretrained_path(t5, tmp_path):
    t5.model.save_pretrained(tmp_path / "text_encoder")
    t5.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = T5TextEncoder(
        pretrained_path=str(tmp_path / "text_encoder"),
        tokenizer_path=str(tmp_path / "tokenizer"),
        max_length=t5.max_length,
        dtype="float32",
    )
    prompts = ["a red ball", "hello"]
    expected, actual = t5(prompts), loaded(prompts)
    assert torch.equal(actual.mask, expected.mask)
    torch.testing.assert_close(actual.tokens, expected.tokens)


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A tiny random open_clip model saved as an open_clip local dir: (model, dir, checkpoint file)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP_CONFIG).eval()
    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model, folder, folder / "open_clip_pytorch_model.bin"


def _open_clip_block_outputs(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Reference: every block output of open_clip's visual tower after Wan's preprocessing."""
    x = F.interpolate(images, size=model.visual.image_size, mode="bicubic", align_corners=False)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = model.visual._embeds(((x + 1) / 2 - mean) / std)
        outputs = []
        for block in model.visual.transformer.resblocks:
            x = block(x)
            outputs.append(x)
    return outputs


def test_clip_shapes_and_layers():
    penultimate = tiny(CLIPVisionEncoder)
    last = CLIPVisionEncoder(tiny_config=TINY_CLIP_CONFIG, layer=-1, dtype="float32")
    assert penultimate.num_tokens == (32 // 8) ** 2 + 1 and penultimate.hidden_size == 32
    images = torch.rand(3, 3, 40, 48) * 2 - 1
    out = penultimate(images)
    assert out.shape == (3, penultimate.num_tokens, penultimate.hidden_size)
    assert len(penultimate.visual.transformer.resblocks) == 1  # blocks after `layer` are dropped
    last.load_state_dict(penultimate.state_dict(), strict=False)
    assert not torch.allclose(last(images), out)
    with pytest.raises(ValueError, match="out of range"):
        CLIPVisionEncoder(tiny_config=TINY_CLIP_CONFIG, layer=2)
    with pytest.raises(ValueError, match="images must be"):
        penultimate(images[0])


@pytest.mark.parametrize("layer", [-2, -1])
def test_clip_from_pretrained_path_matches_open_clip(clip_checkpoint, layer):
    model, folder, checkpoint = clip_checkpoint
    encoder = CLIPVisionEncoder(
        model_name=f"local-dir:{folder}", pretrained_path=str(checkpoint), layer=layer, dtype="float32"
    )
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    torch.testing.assert_close(encoder(images), _open_clip_block_outputs(model, images)[layer])


def test_clip_from_visual_only_checkpoint(clip_checkpoint, tmp_path):
    model, folder, checkpoint = clip_checkpoint
    torch.save(model.visual.state_dict(), tmp_path / "visual.pt")
    name = f"local-dir:{folder}"
    full = CLIPVisionEncoder(model_name=name, pretrained_path=str(checkpoint), dtype="float32")
    visual = CLIPVisionEncoder(model_name=name, pretrained_path=str(tmp_path / "visual.pt"), dtype="float32")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(visual(images), full(images))
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        CLIPVisionEncoder(model_name="no-such-model", pretrained_path=str(checkpoint))


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_vae_encode_decode_shapes(vae, frames):
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, vae.latent_channels, 1 + (frames - 1) // 4, 2, 3)
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert (vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (4, 8, 4)


def test_vae_encode_images_is_first_frame(vae):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = vae.encode_images(images)
    assert latents.shape == (3, 4, 1, 2, 2)
    video = torch.cat([images[:, :, None], torch.rand(3, 3, 4, 16, 16)], dim=2)  # causal: frame 0 alone
    torch.testing.assert_close(vae.encode(video)[:, :, :1], latents)


def test_vae_normalisation(vae):
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    raw = vae.vae.encode(video).latent_dist.mode()  # (1, z, 2, 2, 2)
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = vae.encode(video)
    torch.testing.assert_close(latents, (raw - mean) / std)
    torch.testing.assert_close(vae.decode(latents), vae.vae.decode(raw).sample.clamp(-1, 1))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 8, 16, 16), "got 8: use 5 or 9 frames"),
        ((1, 3, 0, 16, 16), "use 1 or 5 frames"),
        ((1, 3, 5, 12, 16), "12x16 is not a multiple of 8: resize or crop to 8x16"),
        ((1, 5, 3, 16, 16), "3 RGB channels"),
        ((3, 16, 16), "encode_images"),
    ],
)
def test_vae_rejects_bad_video(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_vae_rejects_bad_latents_and_config(vae):
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="give latents_mean with 4 values"):
        WanVAE(tiny_config={"base_dim": 4, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1})


def test_vae_from_pretrained_path(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path)
    loaded = WanVAE(pretrained_path=str(tmp_path), dtype="float32")
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(video), vae.encode(video))
    assert loaded.latent_channels == vae.latent_channels


def test_vae_tiling_and_sampling():
    tiny = copy.deepcopy(encoders.vae.TINY_VAE_CONFIG)
    sampled = WanVAE(tiny_config=tiny, sample=True, tiling=True, dtype="float32")
    assert sampled.vae.use_tiling
    video = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    assert not torch.equal(sampled.encode(video), sampled.encode(video))


# ---------------------------------------------------------------------------------------------
# PatchVAE (fixed, lossless)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial,temporal,frames", [(2, 4, 9), (4, 4, 17), (8, 2, 5), (1, 1, 3)])
def test_patch_vae_is_lossless_with_wan_frame_arithmetic(spatial, temporal, frames):
    vae = PatchVAE(spatial=spatial, temporal=temporal, scale=0.5, shift=0.1)
    video = torch.rand(2, 3, frames, 8 * spatial, 4 * spatial) * 2 - 1  # (B, 3, F, H, W)
    latents = vae.encode(video)
    assert latents.shape == (2, 3 * temporal * spatial**2, 1 + (frames - 1) // temporal, 8, 4)
    torch.testing.assert_close(vae.decode(latents), video, rtol=0, atol=1e-6)
    # Latent frame 0 is the first frame alone; later ones hold `temporal` frames each.
    torch.testing.assert_close(latents[:, :, :1], vae.encode_images(video[:, :, 0]))
    changed = video.clone()
    changed[:, :, 1] = 0.0
    differs = (vae.encode(changed) != latents).any(dim=(0, 1, 3, 4))  # per latent frame
    if frames > 1:
        assert differs.tolist() == [False, True] + [False] * (latents.shape[2] - 2)
    assert (latents * 0.5 + 0.1).std() > 0.5  # latents = (pixels - shift) / scale


def test_patch_vae_decodes_the_mean_of_the_first_frame_copies():
    vae = PatchVAE(spatial=2, temporal=4)
    latents = vae.encode(torch.zeros(1, 3, 5, 4, 4))
    latents[:, :, 0] = torch.linspace(-0.5, 0.5, latents.shape[1])[:, None, None]  # copies disagree
    first = vae.decode(latents)[:, :, 0]
    per_copy = latents[:, :, 0].view(1, 3, 4, 2, 2, 2, 2).mean(2)  # (B, c, s1, s2, h, w)
    torch.testing.assert_close(first, per_copy.permute(0, 1, 4, 2, 5, 3).reshape(1, 3, 4, 4))


def test_patch_vae_is_frozen_and_follows_the_module():
    vae = tiny(PatchVAE)
    assert not list(vae.parameters()) and vae.device == torch.device("cpu")
    vae.train()
    assert not vae.training
    assert vae.encode(torch.zeros(1, 3, 5, 4, 4)).dtype == torch.float32
    assert PatchVAE(dtype="bfloat16").encode(torch.zeros(1, 3, 1, 4, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "shape,message",
    [((1, 3, 6, 8, 8), "1 \\+ 4k frames.*use 5 or 9"), ((1, 3, 5, 6, 8), "multiple of 4.*4x8"),
     ((1, 5, 8, 8), "5-D")],
)
def test_patch_vae_rejects_bad_video(shape, message):
    with pytest.raises(ValueError, match=message):
        PatchVAE(spatial=4).encode(torch.zeros(shape))


def test_patch_vae_rejects_bad_arguments_and_latents():
    with pytest.raises(ValueError, match="spatial and temporal"):
        PatchVAE(spatial=0)
    with pytest.raises(ValueError, match="scale"):
        PatchVAE(scale=0.0)
    with pytest.raises(ValueError, match=r"\(B, 48, f, h, w\)"):
        tiny(PatchVAE).decode(torch.zeros(1, 16, 2, 4, 4))


def test_tiled_decoding_is_part_of_the_vae_contract():
    """``decode(latents, tiled=True)``: the Wan VAE tiles for that call only (and leaves its own
    setting as it was); the patch VAE, which has no tiling, says so instead of decoding untiled."""
    from encoders.base import VideoAutoencoder

    wan, patch = tiny(encoders.WanVAE), tiny(encoders.PatchVAE)
    assert isinstance(wan, VideoAutoencoder) and isinstance(patch, VideoAutoencoder)
    latents = torch.randn(1, wan.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    tiling_seen = []  # diffusers' tiling flag while its decoder runs
    wan.vae.decoder.register_forward_pre_hook(lambda *_: tiling_seen.append(wan.vae.use_tiling))
    wan.decode(latents, tiled=True)
    assert tiling_seen and all(tiling_seen) and not wan.vae.use_tiling
    tiling_seen.clear()
    wan.decode(latents)
    assert tiling_seen and not any(tiling_seen)
    with pytest.raises(ValueError, match="PatchVAE has no tiled decoding"):
        patch.decode(torch.zeros(1, patch.latent_channels, 1, 2, 2), tiled=True)
