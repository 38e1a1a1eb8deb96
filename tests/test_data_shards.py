"""Shards: pack -> load round trip, validation and rejection reasons, no overwriting, atomic
writes, inspect; clip decoding (fps sampling, buckets, resize/crop)."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bindweave.model.batch import fit_reference
from bindweave.cli.data import main, pack
from bindweave.data.resume import StreamLoader
from bindweave.data.samples import SampleDecoder
from bindweave.data.streams import ShardStream
from bindweave.data.curriculum import Curriculum, Stage
from bindweave.data.shards import AtomicShard, expand_urls
from bindweave.data.video_decode import choose_bucket, decode_clip, scan
from bindweave.data.video_io import read_video
from tests.data_helpers import level, make_clips, make_image, make_video


def finite_batches(shards, decoder, batch_size=1, num_workers=0):
    stream = ShardStream([[shards]], [None], Curriculum([Stage(urls=shards)]), decoder, batch_size, finite=True)
    return list(StreamLoader(stream, num_workers=num_workers))


def test_pack_then_load_round_trip_exact_frames_references_and_prompts(tmp_path):
    manifest = make_clips(tmp_path / "clips", count=4)
    summary = pack(str(manifest), str(tmp_path / "shards"), samples_per_shard=3, num_frames=5, fps=4, progress=False)
    assert summary["samples"] == 4 and not summary["rejected"] and len(summary["shards"]) == 2
    shards = expand_urls(str(tmp_path / "shards" / "shard-*.tar"))
    assert [s.rsplit("/", 1)[1] for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(shards[0]) as tar:  # plain tar reads it
        assert sorted(tar.getnames()[:4]) == ["clip-0.json", "clip-0.mask0.png", "clip-0.mp4", "clip-0.ref0.png"]

    decoder = SampleDecoder(num_frames=5, fps=4, buckets=[(32, 48)], use_masks=False)
    batches = finite_batches(shards, decoder)
    assert [b["id"][0] for b in batches] == ["clip-0", "clip-1", "clip-2", "clip-3"]
    items = [json.loads(line) for line in manifest.read_text().splitlines()]
    for batch, item in zip(batches, items):
        assert batch["prompt"] == [item["prompt"]]
        original = read_video(tmp_path / "clips" / item["video"])  # (9, 32, 48, 3) at 8 fps
        # 5 frames at 4 fps from an 8 fps source: source frames 0, 2, 4, 6, 8, bit-exact.
        assert torch.equal(batch["frames"][0], original[[0, 2, 4, 6, 8]])
        assert batch["num_references"] == [len(item["references"])]
        for r, path in enumerate(item["references"]):
            expected, _ = fit_reference(Image.open(tmp_path / "clips" / path), 32, 48)
            assert torch.equal(batch["references"][0, r], ((expected + 1) * 127.5).round().to(torch.uint8))


def test_pack_validates_items_and_reports_why(tmp_path):
    clips = tmp_path / "clips"
    make_clips(clips, count=1)
    make_video(clips / "short.mp4", num_frames=3)
    (clips / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    data = (clips / "clip0.mp4").read_bytes()
    (clips / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (clips / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ok = {"video": "clip0.mp4", "references": ["clip0_ref0.png"], "prompt": "p"}
    items = [
        {**ok, "id": "good"},
        {**ok, "id": "short", "video": "short.mp4"},
        {**ok, "id": "corrupt", "video": "corrupt.mp4"},
        {**ok, "id": "truncated", "video": "truncated.mp4"},
        {**ok, "id": "missing", "video": "nowhere.mp4"},
        {**ok, "id": "bad-image", "references": ["broken.png"]},
        {**ok, "id": "no-refs", "references": []},
        {**ok, "id": "five-refs", "references": ["clip0_ref0.png"] * 5},
        {"id": "no-prompt", "video": "clip0.mp4", "references": ["clip0_ref0.png"]},
        {**ok, "id": "subjects", "subjects": ["a", "b"]},
        {**ok, "id": "good"},  # duplicate key
    ]
    manifest = clips / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(i) for i in items) + "\n{not json\n")
    summary = pack(str(manifest), str(tmp_path / "out"), num_frames=5, fps=8, workers=2, progress=False)
    assert summary["samples"] == 1
    by_key = {r["key"]: r["reason"] for r in summary["rejected"]}
    assert by_key == {
        "short": "short_video", "corrupt": "corrupt_video", "truncated": "corrupt_video", "missing": "missing_file",
        "bad-image": "bad_image", "no-refs": "reference_count", "five-refs": "reference_count",
        "no-prompt": "missing_key", "subjects": "bad_json", "good": "duplicate_key", "line12": "bad_json",
    }
    assert json.loads((tmp_path / "out" / "shard.pack.json").read_text())["rejected_by_reason"]["reference_count"] == 2


def test_pack_never_overwrites_and_writes_shards_atomically(tmp_path, capsys, monkeypatch):
    manifest = make_clips(tmp_path / "clips", count=3)
    out = tmp_path / "out"
    args = ["pack", "--input", str(manifest), "--output", str(out), "--num_frames", "5", "--fps", "8",
            "--samples_per_shard", "1", "--workers", "1", "--no_progress"]
    main(args)
    assert "Wrote 3 samples to 3 shard(s)" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    with pytest.raises(SystemExit) as error:
        main(args)
    assert error.value.code == 1 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before

    # --overwrite with fewer samples per shard count: the stale third shard goes.
    main(args[:-5] + ["--samples_per_shard", "2", "--workers", "1", "--no_progress", "--overwrite"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]

    # A failure mid-write leaves the existing shard untouched and no temporary file behind.
    target = out / "shard-000000.tar"
    original = target.read_bytes()
    with pytest.raises(RuntimeError):
        with AtomicShard(target, overwrite=True) as shard:
            shard.write("a", {"json": b"{}"})
            raise RuntimeError("interrupted")
    assert target.read_bytes() == original
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shard.pack.json"]


def test_pack_from_a_folder_and_inspect(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    make_video(folder / "a.mp4", num_frames=9, height=48, width=32)
    make_image(folder / "a.ref0.jpg")
    make_image(folder / "a.ref1.png")
    (folder / "a.txt").write_text("a prompt from a text file\n")
    make_video(folder / "b.mp4", num_frames=13)
    make_image(folder / "b.ref0.png")
    (folder / "b.json").write_text(json.dumps({"prompt": "b", "source_id": "vid-b"}))
    summary = pack(str(folder), str(tmp_path / "out"), num_frames=5, fps=8, progress=False)
    assert summary["samples"] == 2, summary["rejected"]

    main(["inspect", str(tmp_path / "out" / "shard-*.tar"), "--check"])
    text = capsys.readouterr().out
    assert "1 shard(s), 2 valid sample(s) (2 raw, 0 cached), 0 broken." in text
    assert "32x48 ×1" in text and "48x32 ×1" in text and "1 ×1, 2 ×1" in text
    main(["inspect", str(tmp_path / "out" / "shard-000000.tar"), "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["duration_s"] == {"total": 2.5, "min": 1.0, "mean": 1.25, "max": 1.5}
    assert stats["fps"] == {"8.0": 2} and stats["references"] == {"1": 1, "2": 1}


def test_clip_sampling_follows_the_target_fps(tmp_path):
    data = make_video(tmp_path / "v.mp4", num_frames=13, fps=12).read_bytes()
    assert scan(data).num_frames == 13

    def indices(frames):  # which source frame each clip frame shows (its grey level)
        corner = frames[:, -4:, -4:].float().mean(dim=(1, 2, 3))
        return [int(np.argmin([abs(c - level(i)) for i in range(13)])) for c in corner]

    clip = torch.from_numpy(decode_clip(data, num_frames=5, fps=8))  # times 0, 1/8, ... 4/8 s
    assert indices(clip) == [0, 1, 3, 4, 6]  # the frame shown at each time (12 fps source)
    clip = torch.from_numpy(decode_clip(data, num_frames=9, fps=24))  # faster than the source: repeats
    assert indices(clip) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert indices(torch.from_numpy(decode_clip(data, num_frames=5, fps=None))) == [0, 1, 2, 3, 4]
    assert indices(torch.from_numpy(decode_clip(data, num_frames=9, fps=8)))[-1] == 12  # exactly long enough
    from bindweave.data.video_decode import VideoDecodeError

    with pytest.raises(VideoDecodeError, match="too short"):
        decode_clip(data, num_frames=10, fps=8)  # needs 1.125 s; frames 0..12 at 12 fps span 1 s
    rng = __import__("random").Random(3)
    starts = {indices(torch.from_numpy(decode_clip(data, 3, fps=12, random_crop=True, rng=rng)))[0] for _ in range(8)}
    assert len(starts) > 1 and max(starts) <= 10


def test_buckets_resize_and_crop(tmp_path):
    buckets = [(32, 48), (48, 32), (32, 32)]
    assert choose_bucket(32, 48, buckets) == (32, 48)
    assert choose_bucket(480, 270, buckets) == (48, 32)
    assert choose_bucket(100, 110, buckets) == (32, 32)
    portrait = make_video(tmp_path / "p.mp4", num_frames=5, height=64, width=40).read_bytes()
    clip = decode_clip(portrait, num_frames=5, fps=None, buckets=buckets)  # 40x64 -> cover 48x32 -> crop
    assert clip.shape == (5, 48, 32, 3)
    # Scaled by 0.8 to 32x51, centre crop of 48 rows: the grey level survives, the size is exact.
    assert abs(float(clip[0, -3:, -3:].mean()) - level(0)) < 3


def test_lossless_rgb_frames_skip_swscale_and_keep_every_pixel():
    """libx264rgb stores gbrp planes: frame_to_rgb reads them directly (no colour conversion) and
    gives exactly what FFmpeg's rgb24 conversion gives; other formats still convert."""
    import io

    import av

    from bindweave.tasks.sprites.scenes import encode_video
    from bindweave.data.video_decode import frame_to_rgb

    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    with av.open(io.BytesIO(encode_video(frames, fps=8))) as container:
        decoded = list(container.decode(video=0))
    assert decoded[0].format.name == "gbrp"
    for frame, expected in zip(decoded, frames):
        np.testing.assert_array_equal(frame_to_rgb(frame), frame.to_ndarray(format="rgb24"))
        np.testing.assert_array_equal(frame_to_rgb(frame), expected)
    yuv = decoded[0].reformat(format="yuv420p")
    assert frame_to_rgb(yuv).shape == (16, 24, 3)
