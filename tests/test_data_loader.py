"""The webdataset loader: rank/worker splitting without duplicates, the fixed-length epoch, broken
samples skipped and reported (never a crash), start-up errors, references and the float batch."""

import io
import random

import pytest
import torch
import webdataset as wds
from PIL import Image

from bindweave.data.curriculum import Curriculum, Stage
from bindweave.data.datamodule import WebDataModule
from bindweave.data.resume import StreamLoader
from bindweave.data.samples import ReferenceAugmentation, SampleDecoder
from bindweave.data.streams import ShardStream
from bindweave.model.batch import to_model_batch
from bindweave.data.shards import expand_urls
from tests.data_helpers import make_video, png_bytes, raw_sample, write_tar

DECODER = dict(num_frames=5, fps=8, buckets=[(32, 48)])


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    return make_video(tmp_path_factory.mktemp("video") / "v.mp4").read_bytes()


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory, video) -> list[str]:
    """8 shards of 2 samples each: s<shard>-<i>."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(8):
        write_tar(folder / f"shard-{s:06d}.tar", [raw_sample(f"s{s}-{i}", video) for i in range(2)])
    return expand_urls(str(folder / "shard-{000000..000007}.tar"))


def stream(shards, batch_size=1, **kwargs) -> ShardStream:
    decoder = kwargs.pop("decoder", SampleDecoder(**DECODER))
    return ShardStream([[shards]], [None], Curriculum([Stage(urls=shards)]), decoder, batch_size, **kwargs)


def ids(batches) -> list[str]:
    return [i for b in batches for i in b["id"]]


@pytest.mark.parametrize("finite", [True, False])
def test_ranks_and_workers_split_the_shards_without_duplicates(eight_shards, finite):
    seen = []
    for rank in range(2):
        # Training: an epoch of 8 samples per rank is one pass over its 4 shards (2 workers x 2).
        loader = StreamLoader(stream(eight_shards, rank=rank, world_size=2, finite=finite, batches=None if finite else 8),
                              num_workers=2)
        got = ids(loader)
        assert len(got) == 8
        seen += got
    assert sorted(seen) == sorted(f"s{s}-{i}" for s in range(8) for i in range(2))


def test_fixed_length_epochs_and_reshuffled_passes(eight_shards):
    module = WebDataModule(urls=eight_shards, batch_size=2, samples_per_epoch=10, num_workers=2, shuffle_buffer=4, **DECODER)
    module.setup("fit")
    loader = module.train_dataloader()
    assert len(loader) == 5
    first, again = list(loader), list(loader)
    assert len(first) == 5 and all(len(b["id"]) == 2 for b in first)
    assert ids(first) == ids(again)  # nothing was trained: the loader starts at the same position
    # The Trainer trains the batches (the datamodule records them): the next epoch goes on from there.
    module.trainer = type("T", (), {"global_step": 5, "accumulate_grad_batches": 1, "strategy": None, "callbacks": [],
                                    "training": True})()
    for batch in first:
        module.on_before_batch_transfer(batch, 0)
    second = list(module.train_dataloader())
    assert len(second) == 5 and ids(first) != ids(second)  # another epoch, new passes in another order
    assert [b["resume"]["position"] for b in second] == list(range(5, 10))


def test_broken_samples_are_skipped_counted_and_reported(tmp_path, video):
    bad = tmp_path / "bad-000000.tar"
    samples = [
        raw_sample("good0", video),
        raw_sample("corrupt", b"\x00\x00\x00\x18ftypmp42" + bytes(200)),
        raw_sample("truncated", video[: len(video) // 2]),
        raw_sample("badimage", video, refs=0, **{"ref0.png": b"\x89PNG\r\n\x1a\n garbage"}),
        raw_sample("nokey", video, prompt=None),
        raw_sample("badjson", video, json=b"{not json"),
        raw_sample("zero", video, refs=0),
        raw_sample("five", video, refs=5),
        {"__key__": "novideo", "json": b'{"prompt": "p"}', "ref0.png": png_bytes()},
        raw_sample("good1", video),
    ]
    write_tar(bad, samples)
    truncated = tmp_path / "bad-000001.tar"
    whole = write_tar(tmp_path / "whole.tar", [raw_sample("good2", video), raw_sample("lost", video)]).read_bytes()
    truncated.write_bytes(whole[: whole.find(b"lost.mp4") + 512 + 100])  # cut inside lost.mp4

    batches = list(StreamLoader(stream([str(truncated), str(bad)], finite=True)))
    assert ids(batches) == ["good2", "good0", "good1"]
    reports = [r for b in batches for r in b["skipped"]]
    by_key = {r["key"]: r["reason"] for r in reports if r["key"]}
    assert by_key == {
        "corrupt": "corrupt_video", "truncated": "corrupt_video", "badimage": "bad_image", "nokey": "missing_key",
        "badjson": "bad_json", "zero": "reference_count", "five": "reference_count", "novideo": "missing_file",
        "lost": "missing_file",  # only its record made it into the cut-off shard
    }
    assert all(r["shard"] == str(bad) for r in reports if r["key"] not in (None, "lost"))
    cut = [r for r in reports if not r["key"]]
    assert cut and {r["reason"] for r in cut} == {"unreadable_shard"}
    assert all(str(truncated) in (r["shard"] or r["message"]) for r in cut)

    # Only broken samples, over and over: a clear error, not an endless loop.
    all_bad = write_tar(tmp_path / "allbad.tar", [s for s in samples if not s["__key__"].startswith("good")])
    with pytest.raises(RuntimeError, match="gave no valid sample"):
        list(StreamLoader(stream([str(all_bad)], batches=4)))
    with pytest.raises(RuntimeError, match="5 broken samples in a row"):
        list(StreamLoader(stream([str(all_bad)], batches=4, max_consecutive_broken=5)))


def test_clear_errors_at_start_up(tmp_path, eight_shards, video):
    with pytest.raises(ValueError, match="match no file.*nowhere"):
        WebDataModule(urls=str(tmp_path / "nowhere-{000000..000003}.tar"), **DECODER).setup("fit")
    with pytest.raises(ValueError, match="match no file"):
        WebDataModule(urls=eight_shards, val_urls=str(tmp_path / "val-*.tar"), num_workers=0, **DECODER).setup("fit")
    junk = [write_tar(tmp_path / f"junk-{i}.tar", [raw_sample(f"j{i}", b"junk"), raw_sample(f"k{i}", video, refs=0)])
            for i in range(2)]
    with pytest.raises(ValueError, match=r"No valid sample .* corrupt_video.*reference_count"):
        WebDataModule(urls=[str(p) for p in junk], num_workers=1, **DECODER).setup("fit")
    with pytest.raises(ValueError, match="every worker needs a shard"):
        WebDataModule(urls=eight_shards[:3], num_workers=4, **DECODER).setup("fit")
    with pytest.raises(ValueError, match="exactly one of"):
        WebDataModule(**DECODER)


def test_references_masks_augmentation_and_the_float_batch(tmp_path, video):
    mask = Image.new("L", (20, 24), 0)
    mask.paste(255, (0, 0, 10, 24))  # left half is the subject
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    shard = write_tar(tmp_path / "m.tar", [raw_sample("m", video, refs=2, **{"mask0.png": buffer.getvalue()}),
                                           raw_sample("n", video, refs=1)])
    plain = stream([str(shard)], batch_size=2, finite=True, decoder=SampleDecoder(**DECODER, use_masks=True))
    batch = next(iter(StreamLoader(plain)))
    refs = batch["references"]  # (2, 2, 3, 32, 48) uint8
    assert refs.dtype == torch.uint8 and refs.shape == (2, 2, 3, 32, 48) and batch["num_references"] == [2, 1]
    # Reference 0 (black, 20x24, fitted to 27x32 at x = 10..37): the subject (left half) stays, the rest is white.
    assert (refs[0, 0, :, :, 12:20] == 0).all() and (refs[0, 0, :, :, 27:] == 255).all()
    assert (refs[0, 1] == 30).any() and (refs[1, 1] == 0).all()  # padding

    augmented = SampleDecoder(**DECODER, augmentation=ReferenceAugmentation(flip=1.0, rotation=15, scale=(0.7, 0.7)))
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())))
    a = augmented(sample, random.Random(0))
    assert a["references"].shape == (2, 3, 32, 48) and not torch.equal(a["references"][0], refs[0, 0])

    model_batch = to_model_batch(dict(batch))
    assert "frames" not in model_batch and model_batch["video"].shape == (2, 3, 5, 32, 48)
    assert model_batch["video"].is_contiguous() and -1 <= model_batch["video"].min() < model_batch["video"].max() <= 1
    torch.testing.assert_close(model_batch["video"][0, :, 2], batch["frames"][0, 2].permute(2, 0, 1).float() / 127.5 - 1)
    assert model_batch["references"].dtype == torch.float32 and (model_batch["references"][1, 1] == 0).all()
