"""`bindweave predict` over a JSONL of requests: files written, done ids skipped, bad requests survived."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bindweave.cli.app import run_cli
from bindweave.errors import UserError
from bindweave.inference.pipeline import BindWeavePipeline
from bindweave.inference.requests import RequestDataset, SizeBatchSampler, collate_requests, default_id, read_requests
from bindweave.inference.sampler import predict_batch
from bindweave.data.video_io import read_video
from tests.pipeline_helpers import TINY, cli_module, draw_reference, tiny_model_config, write_checkpoint


@pytest.fixture(scope="module")
def module():
    return cli_module(tiny_model_config(num_steps=2))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_predict_writes_mp4_png_json_skips_done_and_survives_bad_requests(module, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = write_checkpoint(module, tmp_path / "tiny.ckpt")
    draw_reference(tmp_path / "red.png", (220, 40, 40))
    draw_reference(tmp_path / "blue.png", (40, 80, 220), "square")
    write_jsonl(tmp_path / "requests.jsonl", [
        {"id": "red", "prompt": "the red circle moves left", "references": ["red.png"]},
        {"id": "pair", "prompt": "the red circle and the blue square", "references": ["red.png", "blue.png"], "seed": 7},
        {"id": "late", "prompt": "the blue square moves up", "references": ["later.png"]},
        {"id": "empty", "prompt": " ", "references": ["red.png"]},
        "{this is not json",
        {"id": "odd", "prompt": "wrong size", "references": ["red.png"], "height": 40, "width": 40},
    ])
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump({"data": {
        "class_path": "bindweave.inference.requests.RequestDataModule",
        "init_args": {"requests": str(tmp_path / "requests.jsonl"), "batch_size": 2}}}))
    args = ["predict", "-c", str(TINY), "-c", "predict.yaml", "--ckpt_path", str(checkpoint),
            "--model.sampling.num_steps", "2", "--trainer.enable_progress_bar", "false"]
    run_cli(args)
    out = tmp_path / "outputs" / "tiny" / "videos"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "red.mp4", "red.png", "red.json", "pair.mp4", "pair.png", "pair.json", "summary.md",
        "late.error.json", "empty.error.json", "line-5.error.json", "odd.error.json"])
    assert read_video(out / "pair.mp4").shape == (5, 32, 32, 3)
    record = json.loads((out / "pair.json").read_text())
    assert record["request"] == {"id": "pair", "prompt": "the red circle and the blue square",
                                 "references": [str(tmp_path / "red.png"), str(tmp_path / "blue.png")],
                                 "seed": 7, "num_frames": 5, "height": 32, "width": 32}
    assert record["sampling"]["num_steps"] == 2 and record["checkpoint"] == str(checkpoint)
    assert record["model_config"]["dit"]["init_args"]["dim"] == 64
    # Contact sheet: 2 references then 5 frames, the 32-pixel tiles shown 4x (128), 8-pixel gaps (16 before the frames).
    sheet = np.asarray(Image.open(out / "pair.png"))
    assert sheet.shape == (128 + 16, 7 * 128 + 8 * 8 + 8, 3)
    assert sheet[8 + 64, 8 + 64].tolist() == [220, 40, 40] and sheet[8 + 64, 144 + 64].tolist()[2] > 200
    errors = {p.name.split(".")[0]: json.loads(p.read_text())["error"] for p in out.glob("*.error.json")}
    assert "later.png' does not exist; fix the path" in errors["late"] and "line 3" in errors["late"]
    assert "prompt is empty" in errors["empty"] and "not valid JSON" in errors["line-5"]
    assert "request 'odd' (line 6 of requests.jsonl): height=40" in errors["odd"] and "Use 32" in errors["odd"]
    summary = capsys.readouterr().out
    assert "Predict summary (2 done, 4 failed)" in summary and "| late" in summary

    # Rerun after fixing one request: only that one runs; finished ones are skipped, not rewritten.
    stamp = (out / "red.mp4").stat().st_mtime_ns
    draw_reference(tmp_path / "later.png", (40, 80, 220), "square")
    run_cli(args)
    assert (out / "red.mp4").stat().st_mtime_ns == stamp
    assert (out / "late.mp4").exists() and not (out / "late.error.json").exists()
    summary = capsys.readouterr().out
    assert "Predict summary (1 done, 3 failed, 2 skipped)" in summary


def test_a_bad_request_does_not_take_its_batch_mates_down(module, tmp_path):
    draw_reference(tmp_path / "red.png", (220, 40, 40))
    write_jsonl(tmp_path / "r.jsonl", [
        {"id": "good", "prompt": "the red circle moves left", "references": ["red.png"], "seed": 5},
        {"id": "five", "prompt": "too many", "references": ["red.png"] * 5},
    ])
    dataset = RequestDataset(tmp_path / "r.jsonl", 5, 32, 32)
    batch = collate_requests([dataset[0], dataset[1]])
    assert batch["num_references"] == [1, 5] and not batch["failed"]  # the model, not the data, rejects it
    out = predict_batch(module.model, batch, 0, module.sampling)
    assert out["id"] == ["good"] and out["video"].shape == (1, 5, 32, 32, 3)
    assert [f["id"] for f in out["failed"]] == ["five"] and "at most 4" in out["failed"][0]["error"]
    # The survivor is the video its record reproduces, alone or through the pipeline.
    alone = predict_batch(module.model, collate_requests([dataset[0]]), 0, module.sampling)
    assert torch.equal(out["video"][0], alone["video"][0])
    request = out["request"][0]
    video = BindWeavePipeline.from_module(module)(request["prompt"], request["references"], seed=request["seed"],
                                      num_frames=request["num_frames"], height=request["height"],
                                      width=request["width"], progress=False)
    assert torch.equal(video.frames, out["video"][0])


def test_requests_file_is_checked_line_by_line(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [
        "# comments and blank lines are skipped",
        "",
        {"prompt": "A Red  Circle!", "references": "a.png"},
        {"prompt": "x", "refs": ["a.png"]},
        {"id": "dup", "prompt": "x"},
        {"id": "dup", "prompt": "y"},
        {"id": "../escape", "prompt": "x"},
        {"prompt": "x", "num_frames": 8},
        {"prompt": "x", "seed": -1},
        {"prompt": "big", "height": 64, "width": 64},
        {"prompt": "small"},
    ])
    entries = read_requests(tmp_path / "r.jsonl", 5, 32, 32, max_references=4)
    first = entries[0]
    assert first.id.startswith("a-red-circle-") and first.references == [str(tmp_path / "a.png")]
    assert (first.seed, first.num_frames, first.height, first.width) == (0, 5, 32, 32)
    assert first.id == default_id({"prompt": "A Red  Circle!", "references": ["a.png"], "seed": 0,
                                   "num_frames": 5, "height": 32, "width": 32})  # stable across files and lines
    errors = [e["error"] for e in entries if isinstance(e, dict)]
    assert "unknown key(s) ['refs']" in errors[0] and "line 4" in errors[0]
    assert "already used by line 5" in errors[1]
    assert "cannot name a file" in errors[2]
    assert "1 + 4k" in errors[3] and "Use 5 or 9" in errors[3]
    assert "non-negative integer" in errors[4]
    # Requests are batched by size only.
    dataset = RequestDataset(tmp_path / "r.jsonl", 5, 32, 32)
    sizes = [dataset.size_key(i) for i in range(len(dataset))]
    batches = list(SizeBatchSampler(dataset, batch_size=8))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
    with pytest.raises(ValueError, match="does not exist"):
        read_requests(tmp_path / "nope.jsonl", 5, 32, 32)


def test_a_file_that_cannot_be_a_requests_file_is_one_user_error(tmp_path):
    """Problems of the whole file stop the run with one line naming the file and the fix; problems
    of one line stay that line's (test above)."""
    (tmp_path / "pretty.json").write_text(json.dumps([{"prompt": "x"}], indent=2))
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "comments.jsonl").write_text("# nothing yet\n\n")
    (tmp_path / "folder").mkdir()
    cases = {"nope.jsonl": "does not exist", "folder": "is a folder", "comments.jsonl": "has no requests",
             "latin1.jsonl": "is not UTF-8 text",
             "pretty.json": "has no line of JSON (line 1 of pretty.json: not valid JSON"}
    for name, expected in cases.items():
        with pytest.raises(UserError) as caught:
            read_requests(tmp_path / name, 5, 32, 32)
        message = str(caught.value)
        assert expected in message and name in message and "\n" not in message, message
    # One line that is a JSON list is that line's problem, not the file's.
    write_jsonl(tmp_path / "list.jsonl", [[{"prompt": "x"}], {"prompt": "y"}])
    entries = read_requests(tmp_path / "list.jsonl", 5, 32, 32)
    assert "a request is a JSON object" in entries[0]["error"] and entries[1].prompt == "y"


def test_nothing_left_to_do_is_one_empty_batch_and_warnings_travel_with_the_request(module, tmp_path):
    """An empty dataset gives one empty batch (Lightning then runs predict's hooks: the summary says
    "all N already done"); reference warnings reach predict's output, once per request."""
    write_jsonl(tmp_path / "r.jsonl", [{"id": "done", "prompt": "x"}])
    dataset = RequestDataset(tmp_path / "r.jsonl", 5, 32, 32, skip=lambda request_id: True)
    assert len(dataset) == 0 and dataset.skipped == ["done"] and list(SizeBatchSampler(dataset, 4)) == [[]]
    empty = predict_batch(module.model, collate_requests([]), 0, module.sampling)
    assert empty["id"] == [] and empty["failed"] == [] and empty["video"] is None

    Image.new("RGB", (4, 4), (220, 40, 40)).save(tmp_path / "small.png")
    draw_reference(tmp_path / "red.png", (220, 40, 40))
    write_jsonl(tmp_path / "w.jsonl", [
        {"id": "small", "prompt": "a small red circle", "references": ["small.png", "red.png", "small.png"]},
        {"id": "fine", "prompt": "the red circle", "references": ["red.png"]},
    ])
    dataset = RequestDataset(tmp_path / "w.jsonl", 5, 32, 32)
    assert dataset[0]["warnings"] == ["reference 'small.png': 4x4 pixels, enlarged 8.0x to fit the 32x32 video "
                                      "(more than 4x: expect a blurred subject); give one of at least 8x8 pixels"]
    out = predict_batch(module.model, collate_requests([dataset[0], dataset[1]]), 0, module.sampling)
    assert out["id"] == ["small", "fine"] and out["warnings"] == [dataset[0]["warnings"], []]


def test_request_datamodule_takes_sizes_from_the_model(module, tmp_path):
    from types import SimpleNamespace

    from bindweave.inference.requests import RequestDataModule

    write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "prompt": "x"}])
    data = RequestDataModule(str(tmp_path / "r.jsonl"), output_dir=str(tmp_path))
    data.trainer = SimpleNamespace(lightning_module=module, callbacks=[])
    dataset = data.build_dataset()
    assert (dataset.entries[0].num_frames, dataset.entries[0].height) == (5, 32)
    (tmp_path / "a.mp4").write_bytes(b"x"), (tmp_path / "a.json").write_text("{}")
    assert len(data.build_dataset()) == 0 and data.skipped == ["a"]


def test_request_loader_takes_no_more_workers_than_cores(tmp_path):
    """A predict config layered on a training one carries its worker count (configs/sprites.yaml: 4);
    on a 2-core machine torch then warned on every predict."""
    import os
    from types import SimpleNamespace

    from bindweave.inference.requests import RequestDataModule

    write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "prompt": "x"}])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data = RequestDataModule(str(tmp_path / "r.jsonl"), output_dir=str(tmp_path), num_workers=cores + 3,
                             num_frames=5, height=32, width=32)
    data.trainer = SimpleNamespace(lightning_module=None, callbacks=[])
    assert data.predict_dataloader().num_workers == cores
    data = RequestDataModule(str(tmp_path / "r.jsonl"), output_dir=str(tmp_path), num_workers=0,
                             num_frames=5, height=32, width=32)
    data.trainer = SimpleNamespace(lightning_module=None, callbacks=[])
    assert data.predict_dataloader().num_workers == 0


def test_a_request_gives_the_same_video_alone_or_batched_with_longer_ones(tmp_path):
    """Batching pads each conditioner's tokens to the batch's longest (more references, longer
    prompts); with position features on the branches (configs/sprites.yaml) a request's video must
    still not depend on its batch mates. It did: the T5 tokens after the MLLM's moved with the
    batch's longest MLLM sequence, so batch-of-one sampling saw other positions than training."""
    config = tiny_model_config(num_steps=2)
    config["dit"]["init_args"]["branches"] = [
        {"name": "text", "context_dim": 32, "embedder": "mlp", "position": True, "refiner_layers": 1},
        {"name": "image", "context_dim": 32, "embedder": "norm_mlp", "position": True}]
    module = cli_module(config)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for p in module.dit.context_refiners.parameters():  # zero-initialised output projections
            torch.nn.init.normal_(p, std=0.2)
    draw_reference(tmp_path / "red.png", (220, 40, 40))
    draw_reference(tmp_path / "blue.png", (40, 80, 220), "square")
    draw_reference(tmp_path / "green.png", (40, 200, 60))
    write_jsonl(tmp_path / "r.jsonl", [
        {"id": "one", "prompt": "the red circle", "references": ["red.png"], "seed": 1},
        {"id": "three", "prompt": "the red circle moves left while the blue square jumps over the green one",
         "references": ["red.png", "blue.png", "green.png"], "seed": 2},
        {"id": "two", "prompt": "the blue square waits", "references": ["blue.png", "green.png"], "seed": 3},
    ])
    dataset = RequestDataset(tmp_path / "r.jsonl", 5, 32, 32)
    batched = predict_batch(module.model, collate_requests([dataset[i] for i in range(3)]), 0, module.sampling)["video"]
    for i in range(3):
        alone = predict_batch(module.model, collate_requests([dataset[i]]), 0, module.sampling)["video"][0]
        assert (batched[i].int() - alone.int()).abs().max() <= 1, dataset[i]["id"]  # rounding only


def test_contact_sheets_enlarge_small_videos_pixel_for_pixel_and_shrink_large_ones():
    from bindweave.inference.outputs import contact_sheet

    frames = torch.randint(0, 256, (17, 32, 32, 3), dtype=torch.uint8)
    references = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    sheet = contact_sheet(frames, references, max_frames=8, gap=8)
    assert sheet.shape == (128 + 16, 10 * 128 + 11 * 8 + 8, 3)  # 2 references + 8 frames, each 128 x 128
    first = sheet[8:136, 8 + 2 * 136 + 8:][:, :128]  # the first frame's tile, after the references and the double gap
    np.testing.assert_array_equal(first, frames[0].numpy().repeat(4, 0).repeat(4, 1))  # 4 x 4 blocks, no new values
    large = contact_sheet(torch.zeros(3, 512, 256, 3, dtype=torch.uint8), tile_height=256)
    assert large.shape[0] == 256 + 16 and large.shape[1] == 3 * 128 + 4 * 8
    assert contact_sheet(torch.zeros(2, 200, 100, 3, dtype=torch.uint8)).shape[0] == 200 + 16  # between the two: as is


def test_sizes_an_absolute_position_model_was_not_trained_on_are_warned_about(tmp_path):
    """The shipped sprites DiT adds absolute position features (trained at 17 x 32 x 32): another size
    makes a broken video, so the pipeline warns and a predict request carries the warning."""
    import warnings as python_warnings
    from pathlib import Path
    from types import SimpleNamespace

    from bindweave.inference.requests import RequestDataModule

    REPO = Path(__file__).resolve().parents[1]
    pipe = BindWeavePipeline.from_pretrained(REPO / "models/sprites")
    reference = REPO / "examples/sprites/references/sprites-test-0-000010.ref0.png"
    with pytest.warns(UserWarning, match="absolute position features.*leave the size out to use 17x32x32"):
        pipe("On a grey background, the first subject stays still at the centre.", references=[reference],
             height=64, width=64, num_steps=1)
    with python_warnings.catch_warnings():
        python_warnings.simplefilter("error")  # the trained size and fewer frames: no warning
        pipe("On a grey background, the first subject stays still at the centre.", references=[reference],
             num_frames=9, num_steps=1)
    assert pipe.model.size_warning(17, 32, 32, (17, 32, 32)) is None
    assert "17x32x32" in pipe.model.size_warning(21, 32, 32, (17, 32, 32))  # frames past the trained ones
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "a subject", "references": [str(reference)], "height": 64, "width": 64})
                        + "\n" + json.dumps({"prompt": "a subject", "references": [str(reference)]}) + "\n")
    note = lambda f, h, w: pipe.model.size_warning(f, h, w, (17, 32, 32))  # noqa: E731
    dataset = RequestDataset(requests, 17, 32, 32, size_note=note)
    assert "absolute position" in dataset[0]["warnings"][0] and dataset[1]["warnings"] == []
    def build(**options):  # as `bindweave predict` builds it
        data = RequestDataModule(requests=str(requests), skip_done=False, **options)
        data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(sampling=pipe.sampling, model=pipe.model), callbacks=[])
        return data.build_dataset()

    built = build()
    assert "absolute position" in built[0]["warnings"][0] and built[1]["warnings"] == []
    # use_request_sizes false: the 64 x 64 request is sampled at the model's 32 x 32, with no warning.
    at_model_size = build(use_request_sizes=False)
    for item in (at_model_size[0], at_model_size[1]):
        assert (item["height"], item["width"]) == (32, 32) and item["references"].shape[-2:] == (32, 32)
        assert item["warnings"] == []
    assert RequestDataset(requests, 9, 32, 32, use_request_sizes=False)[0]["num_frames"] == 9
