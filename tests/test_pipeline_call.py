"""The pipeline's call as diffusers' WanPipeline's (issue #24): names, output types, batches of
prompts, generators, the step callback, and negative prompts reaching the batch (call and JSONL)."""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

import bindweave.inference.pipeline as pipeline_module
from bindweave.inference.pipeline import BindWeavePipeline, BindWeavePipelineOutput, GeneratedVideo
from bindweave.inference.requests import RequestDataset, collate_requests, default_id, read_requests
from bindweave.inference.sampler import request_records
from conditioners import RelationalConditioner
from tests.pipeline_helpers import cli_module, draw_reference, tiny_model_config

PROMPT = "the red circle moves left"


@pytest.fixture(scope="module")
def pipe():
    return BindWeavePipeline.from_module(cli_module(tiny_model_config(num_steps=2)))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    return {"red": draw_reference(root / "red.png", (220, 40, 40)),
            "blue": draw_reference(root / "blue.png", (40, 80, 220), "square")}


@pytest.fixture
def batches(monkeypatch):
    """The batches the pipeline hands the sampler."""
    seen = []
    real = pipeline_module.sample_videos

    def spy(model, batch, config, **kwargs):
        seen.append(batch)
        return real(model, batch, config, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_videos", spy)
    return seen


def test_package_front_exports_the_pipeline():
    import bindweave

    assert bindweave.BindWeavePipeline is BindWeavePipeline


def test_diffusers_names_mean_the_old_ones(pipe, refs):
    old = pipe(PROMPT, [refs["red"]], seed=3, num_steps=2, guidance_scale=3.0, progress=False)
    new = pipe(PROMPT, [refs["red"]], generator=None, seed=3, num_inference_steps=2, guidance_scale=3.0, progress=False)
    assert isinstance(old, GeneratedVideo) and torch.equal(old.frames, new.frames)
    assert new.sampling.num_steps == 2 and new.sampling.guidance_scale == 3.0
    with pytest.raises(ValueError, match="disagree"):
        pipe(PROMPT, [refs["red"]], num_steps=3, num_inference_steps=2)


def test_output_types_as_diffusers(pipe, refs):
    video = pipe(PROMPT, refs["red"], seed=1, progress=False)
    f, h, w = video.frames.shape[:3]
    out = pipe(PROMPT, refs["red"], seed=1, output_type="np", progress=False)
    assert isinstance(out, BindWeavePipelineOutput)
    assert out.frames.shape == (1, f, h, w, 3) and out.frames.dtype == np.float32
    np.testing.assert_allclose(out.frames[0], video.frames.numpy() / 255.0, atol=1e-6)
    assert torch.equal(out.videos[0].frames, video.frames)
    (pt,) = pipe(PROMPT, refs["red"], seed=1, output_type="pt", return_dict=False, progress=False)
    assert pt.shape == (1, f, 3, h, w) and 0 <= pt.min() and pt.max() <= 1
    pil = pipe(PROMPT, refs["red"], seed=1, output_type="pil", progress=False).frames
    assert len(pil) == 1 and len(pil[0]) == f and isinstance(pil[0][0], Image.Image)
    assert np.array_equal(np.asarray(pil[0][0]), video.frames[0].numpy())
    with pytest.raises(ValueError, match="output_type='latent'.*'np', 'pt', 'pil'"):
        pipe(PROMPT, refs["red"], output_type="latent")


def test_a_list_of_prompts_is_one_batch_and_matches_single_calls(pipe, refs, batches):
    prompts = [PROMPT, "the blue square moves up"]
    both = pipe(prompts, [[refs["red"]], [refs["blue"], refs["red"]]], seed=[3, 5], progress=False)
    assert len(batches) == 1 and batches[0]["num_references"] == [1, 2] and len(both) == 2
    alone = [pipe(prompts[0], [refs["red"]], seed=3, progress=False),
             pipe(prompts[1], [refs["blue"], refs["red"]], seed=5, progress=False)]
    for batched, single in zip(both, alone):
        assert (batched.frames.int() - single.frames.int()).abs().max() <= 1  # batched matmuls round differently
        assert batched.request["seed"] == single.request["seed"]
    assert both[0].references.shape[0] == 1 and both[1].references.shape[0] == 2
    # One list of references is shared by every prompt.
    pipe(prompts, [refs["red"]], progress=False)
    assert batches[-1]["num_references"] == [1, 1]
    with pytest.raises(ValueError, match="1 lists of references for 2 prompt"):
        pipe(prompts, [[refs["red"]]])


def test_videos_per_prompt_and_generators(pipe, refs):
    call = dict(guidance_scale=1.0, progress=False)  # one DiT pass a step: these check seeds, not guidance
    videos = pipe(PROMPT, refs["red"], seed=7, num_videos_per_prompt=2, **call)
    assert [v.request["seed"] for v in videos] == [7, 8]
    assert not torch.equal(videos[0].frames, videos[1].frames)
    first = pipe(PROMPT, refs["red"], generator=torch.Generator().manual_seed(0), **call)
    again = pipe(PROMPT, refs["red"], generator=torch.Generator().manual_seed(0), **call)
    assert torch.equal(first.frames, again.frames)
    # The seed drawn is in the request: it reproduces the video without the generator.
    assert torch.equal(pipe(PROMPT, refs["red"], seed=first.request["seed"], **call).frames, first.frames)
    generator = torch.Generator().manual_seed(0)
    drawn = [pipeline_module._seeds(None, generator, 1)[0] for _ in range(2)]
    assert drawn[0] == first.request["seed"] and drawn[1] != drawn[0]  # one generator moves on, as in diffusers
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPT, refs["red"], seed=1, generator=torch.Generator())


def test_callback_on_step_end_sees_and_replaces_latents(pipe, refs):
    calls = []

    def record(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        calls.append((i, float(t), kwargs["latents"].shape))
        return {}

    plain = pipe(PROMPT, refs["red"], seed=2, num_inference_steps=2, callback_on_step_end=record, progress=False)
    assert [c[0] for c in calls] == [0, 1] and calls[0][1] > calls[1][1] and len(calls[0][2]) == 5
    zeroed = pipe(PROMPT, refs["red"], seed=2, num_inference_steps=2, progress=False,
                  callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])})
    assert not torch.equal(plain.frames, zeroed.frames)
    with pytest.raises(ValueError, match="prompt_embeds.*not available"):
        pipe(PROMPT, refs["red"], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_negative_prompt_reaches_the_batch_and_the_request(pipe, refs, batches):
    video = pipe(PROMPT, refs["red"], negative_prompt="blurry, static", num_videos_per_prompt=2, progress=False)[0]
    assert batches[-1]["negative_prompt"] == ["blurry, static"] * 2
    assert video.request["negative_prompt"] == "blurry, static"
    default = pipe(PROMPT, refs["red"], progress=False)
    assert batches[-1]["negative_prompt"] == [None] and "negative_prompt" not in default.request
    pipe([PROMPT, "x"], refs["red"], negative_prompt=["dark", None], progress=False)
    assert batches[-1]["negative_prompt"] == ["dark", None]
    with pytest.raises(ValueError, match="3 negative_prompts for 2 prompt"):
        pipe([PROMPT, "x"], refs["red"], negative_prompt=["a", "b", "c"])


@pytest.mark.skipif("negative_prompt" not in inspect.signature(RelationalConditioner).parameters,
                    reason="the conditioner does not read negative prompts yet (issue #20)")
def test_a_negative_prompt_changes_the_guided_video(pipe, refs):
    base = pipe(PROMPT, refs["red"], seed=4, guidance_scale=4.0, progress=False)
    negative = pipe(PROMPT, refs["red"], seed=4, guidance_scale=4.0, negative_prompt="a green triangle", progress=False)
    assert not torch.equal(base.frames, negative.frames)
    unguided = [pipe(PROMPT, refs["red"], seed=4, guidance_scale=1.0, negative_prompt=q, progress=False).frames
                for q in (None, "a green triangle")]
    assert torch.equal(*unguided)  # ignored without guidance, as in diffusers


def test_predict_requests_carry_negative_prompts(tmp_path, refs):
    lines = [{"id": "a", "prompt": PROMPT, "negative_prompt": "blurry", "references": [str(refs["red"])]},
             {"id": "b", "prompt": PROMPT, "references": [str(refs["red"])]},
             {"id": "c", "prompt": PROMPT, "negative_prompt": 3}]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    entries = read_requests(path, 5, 32, 32)
    assert entries[0].negative_prompt == "blurry" and entries[1].negative_prompt is None
    assert "\"negative_prompt\" must be a string" in entries[2]["error"]
    assert entries[0].record()["negative_prompt"] == "blurry" and "negative_prompt" not in entries[1].record()
    dataset = RequestDataset(path, 5, 32, 32)
    batch = collate_requests([dataset[0], dataset[1], dataset[2]])
    assert batch["negative_prompt"] == ["blurry", None] and len(batch["failed"]) == 1
    records = request_records(batch, pipeline_module.SamplingConfig(), ["a", "b"])
    assert records[0]["negative_prompt"] == "blurry" and "negative_prompt" not in records[1]
    # A request without a negative prompt keeps the id it had before requests could have one.
    assert default_id({"prompt": PROMPT, "references": [], "seed": 0}) == default_id(
        {"prompt": PROMPT, "references": [], "seed": 0, "negative_prompt": None})
    assert default_id({"prompt": PROMPT}) != default_id({"prompt": PROMPT, "negative_prompt": "blurry"})
