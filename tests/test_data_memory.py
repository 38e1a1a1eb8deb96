"""In-memory cached data: batches equal the streaming collate of the same samples, passes cover
every sample once and split over ranks, resumed runs continue the order, broken samples are
skipped and counted, and ``fit`` runs from it through the CLI."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from bindweave.cli.app import run_cli
from bindweave.data.curriculum import Curriculum, Stage
from bindweave.cli.data import pack
from bindweave.data.samples import SampleDecoder, collate_cached
from bindweave.data.streams import ShardStream
from bindweave.data.feature_cache import cache_shards
from bindweave.data.memory import FeatureStore, MemoryBatches, MemoryCacheDataModule
from bindweave.data.resume import StreamStart
from bindweave.data.shards import FEATURES, expand_urls
from tests.data_helpers import TINY, TINY_CACHED, TINY_SHARDS, make_clips
from tests.helpers import tiny_module

DECODER = dict(num_frames=5, fps=8, buckets=[(32, 48)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Five cached samples (1–3 references, prompts of different lengths) in three shards."""
    folder = tmp_path_factory.mktemp("memory")
    manifest = make_clips(folder / "clips", count=5)
    pack(str(manifest), str(folder / "raw"), num_frames=5, fps=8, samples_per_shard=2, progress=False)
    cache_shards(tiny_module(), expand_urls(str(folder / "raw" / "shard-*.tar")), folder / "cache", SampleDecoder(**DECODER))
    return folder / "cache"


def decoded(cache) -> list[dict]:
    shards = expand_urls(str(cache / "shard-*.tar"))
    stream = ShardStream([[shards]], [None], Curriculum([Stage(urls=shards)]), SampleDecoder(**DECODER, cached=True), 1,
                         finite=True)
    return list(stream.decoded())


def test_a_batch_is_the_streaming_collate_of_the_same_samples(cache):
    samples = decoded(cache)
    store = FeatureStore(samples)
    lengths = {s["features"]["relational"]["mllm_tokens"].shape[0] for s in samples}
    assert len(lengths) > 1 and store.tensors["relational.mllm_tokens"].shape[1] == max(lengths)  # padded to the longest
    for indices in ([2, 0, 4], [1], [3, 1]):
        batch = store.batch(indices, torch.tensor(indices))
        expected = collate_cached([samples[i] for i in indices])
        for key in ("id", "prompt", "num_references", "height", "width", "fps"):
            assert batch[key] == expected[key]
        assert torch.equal(batch["video_latents"], expected["video_latents"])
        assert batch["features"].keys() == expected["features"].keys()
        for conditioner, named in expected["features"].items():
            for name, tensor in named.items():  # trimmed to the batch's longest sample, as collate pads
                assert batch["features"][conditioner][name].shape == tensor.shape, (conditioner, name, indices)
                assert torch.equal(batch["features"][conditioner][name], tensor)
    only = FeatureStore(samples, conditioners=["relational"])
    assert set(only.batch([0], torch.tensor([0]))["features"]) == {"relational"}


def test_passes_cover_every_sample_split_over_ranks_and_resume_in_order(cache):
    store = FeatureStore(decoded(cache))

    def ids(batches, count):
        iterator = iter(batches)
        return [next(iterator)["id"] for _ in range(count)]

    one = ids(MemoryBatches(store, 2, seed=3), 4)  # 5 samples: 2 whole batches per pass
    assert len(set(one[0] + one[1])) == 4 and len(set(one[2] + one[3])) == 4 and one[:2] != one[2:]
    assert ids(MemoryBatches(store, 2, seed=3, start=lambda: StreamStart(batches=2)), 2) == one[2:]  # resumed at batch 2
    assert ids(MemoryBatches(store, 2, seed=4), 2) != one[:2]
    rank0 = ids(MemoryBatches(store, 1, seed=3, rank=0, world_size=2), 2)
    rank1 = ids(MemoryBatches(store, 1, seed=3, rank=1, world_size=2), 2)
    assert not set(sum(rank0, [])) & set(sum(rank1, []))  # disjoint within a pass
    validation = [b["id"] for b in MemoryBatches(store, 2, finite=True)]
    assert sum(validation, []) == store.host["id"]  # one pass in order, the last batch partial
    shared = [b["id"] for b in MemoryBatches(store, 2, finite=True, rank=1, world_size=2)]
    assert shared == [store.host["id"][2:4]]


def test_one_clip_size_only_and_broken_samples_are_skipped_and_counted(cache, tmp_path):
    samples = decoded(cache)
    odd = dict(samples[1], video_latents=torch.zeros(4, 2, 5, 5))
    with pytest.raises(ValueError, match="latent sizes.*WebDataModule"):
        FeatureStore([samples[0], odd])

    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        for name, data in (("bad.json", json.dumps({"prompt": "x", "num_references": 1}).encode()), (f"bad.{FEATURES}", b"junk")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    module = MemoryCacheDataModule([str(cache / "shard-*.tar"), str(broken)], batch_size=2, device="cpu")
    module.setup("fit")
    assert len(module.train_store) == 5
    first = next(iter(module.train_dataloader()))
    assert [r["reason"] for r in first["skipped"]] == ["bad_features"]
    assert next(iter(module.train_dataloader()))["skipped"] == []  # reported once
    with pytest.raises(ValueError, match="No valid cached sample.*bindweave data cache"):
        MemoryCacheDataModule(str(broken), device="cpu").setup("fit")


def test_fit_and_resume_from_memory_through_the_cli(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    memory = ["--data", "bindweave.data.memory.MemoryCacheDataModule", "--data.init_args.urls", str(cache / "shard-*.tar"),
              "--data.init_args.val_urls", str(cache / "shard-*.tar"), "--data.init_args.batch_size", "2"]
    common = ["-c", TINY, "-c", TINY_SHARDS, "-c", TINY_CACHED, "--model.feature_cache", str(cache), *memory,
              "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]
    cli = run_cli(["fit", *common, "--trainer.max_steps", "3"])
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    checkpoint = tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt"
    resumed = run_cli(["fit", *common, "--trainer.max_steps", "5", "--ckpt_path", str(checkpoint)])
    assert resumed.trainer.global_step == 5


def test_denoise_probe_decodes_cached_latents_with_the_configs_vae(cache, tmp_path, monkeypatch):
    """Trained from a feature cache the model holds no VAE: callbacks.DenoiseProbe builds the
    config's to decode x̂₀ and the cached truth, and logs its measures."""
    import csv

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "-c", TINY, "-c", TINY_SHARDS, "-c", TINY_CACHED, "--model.feature_cache", str(cache),
                   "--data", "bindweave.data.memory.MemoryCacheDataModule", "--data.init_args.urls", str(cache / "shard-*.tar"),
                   "--data.init_args.val_urls", str(cache / "shard-*.tar"), "--data.init_args.batch_size", "2",
                   "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", "logs",
                   "--trainer.callbacks+=callbacks.DenoiseProbe", "--trainer.callbacks.every_n_steps", "2",
                   "--trainer.callbacks.sigmas", "[1.0]", "--trainer.callbacks.batches", "1"])
    probe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "DenoiseProbe")
    assert type(cli.model.vae).__name__ == "LatentSpace" and probe._decoder is not None  # built from the config
    rows = [row for row in csv.DictReader(open(next(Path("logs").rglob("metrics.csv")))) if row.get("probe/subject_mse@1.0")]
    assert [int(row["step"]) for row in rows] == [2]
    # The tiny random VAE decodes no uniform background: every pixel is "subject", so the subject
    # error is a number and the background error and the layout AUC are undefined (NaN, not a crash).
    assert 0 < float(rows[0]["probe/subject_mse@1.0"]) < float("inf")
    assert rows[0]["probe/background_mse@1.0"] == rows[0]["probe/layout_auc@1.0"] == "nan"
