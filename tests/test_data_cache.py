"""The feature cache: cached training gives the loss of online encoding on the same samples and
seed, with no encoder built; ``bindweave data cache`` then ``fit`` from the cache through the CLI."""

import json
from pathlib import Path

import pytest
import torch

from bindweave.cli.app import run_cli
from bindweave.data.curriculum import Curriculum, Stage
from bindweave.cli.data import main, pack
from bindweave.data.resume import StreamLoader
from bindweave.data.samples import SampleDecoder
from bindweave.data.streams import ShardStream
from bindweave.model.batch import to_model_batch
from bindweave.data.feature_cache import LatentSpace, cache_shards
from bindweave.data.shards import expand_urls
from encoders.base import FrozenEncoder
from tests.data_helpers import TINY, TINY_CACHED, TINY_SHARDS, make_clips
from tests.helpers import tiny_module

ROOT = Path(__file__).resolve().parents[1]

DECODER = dict(num_frames=5, fps=8, buckets=[(32, 48)])


def one_batch(shards, cached: bool) -> dict:
    decoder = SampleDecoder(**DECODER, cached=cached)
    stream = ShardStream([[shards]], [None], Curriculum([Stage(urls=shards)]), decoder, batch_size=3, finite=True)
    return to_model_batch(next(iter(StreamLoader(stream))))


def seeded_loss(module, batch, drops=None) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return module.flow_loss(batch, drops)


def test_cached_features_give_the_online_loss_without_any_encoder(tmp_path):
    manifest = make_clips(tmp_path / "clips", count=3)  # 1, 2 and 3 references
    pack(str(manifest), str(tmp_path / "raw"), num_frames=5, fps=8, progress=False)
    raw_shards = expand_urls(str(tmp_path / "raw" / "shard-*.tar"))

    online = tiny_module()
    # Non-zero output head and connector, so every condition moves the loss.
    torch.nn.init.normal_(online.dit.head.proj.weight, std=0.5)
    torch.nn.init.normal_(online.conditioners["relational"].connector[2].weight, std=0.5)
    summary = cache_shards(online, raw_shards, tmp_path / "cache", SampleDecoder(**DECODER))
    assert summary.samples == 3 and not summary.rejected

    cached = tiny_module(feature_cache=str(tmp_path / "cache"))
    assert isinstance(cached.vae, LatentSpace) and not any(isinstance(m, FrozenEncoder) for m in cached.modules())
    missing, _ = cached.load_state_dict(online.state_dict(), strict=False)
    assert not missing  # the trainable weights are the same
    assert sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in online.parameters())

    raw_batch = one_batch(raw_shards, cached=False)
    cached_batch = one_batch(expand_urls(str(tmp_path / "cache" / "shard-*.tar")), cached=True)
    assert cached_batch["id"] == raw_batch["id"] and cached_batch["num_references"] == raw_batch["num_references"] == [1, 2, 3]
    assert "video" not in cached_batch and cached_batch["references"].stride() == (0,) * 5  # a placeholder
    online_losses = []
    for drops in (None, [[True, False, False], None, None]):  # the second drops sample 0's prompt (null condition)
        online_losses.append(seeded_loss(online, raw_batch, drops))
        torch.testing.assert_close(seeded_loss(cached, cached_batch, drops), online_losses[-1], rtol=1e-5, atol=1e-6)
    assert online_losses[0] != online_losses[1]  # the null condition from the cache does matter

    # A cached model says what to do when fed raw pixels (its encoders were never loaded).
    with pytest.raises(ValueError, match="feature_cache"):
        cached.flow_loss(raw_batch)


def test_a_bfloat16_cache_halves_the_bytes_and_trains_as_float32(tmp_path):
    manifest = make_clips(tmp_path / "clips", count=3)
    pack(str(manifest), str(tmp_path / "raw"), num_frames=5, fps=8, progress=False)
    raw_shards = expand_urls(str(tmp_path / "raw" / "shard-*.tar"))
    online = tiny_module()
    torch.nn.init.normal_(online.dit.head.proj.weight, std=0.5)
    sizes, losses = {}, {}
    for dtype in ("float32", "bfloat16"):
        cache_shards(online, raw_shards, tmp_path / dtype, SampleDecoder(**DECODER), dtype=dtype)
        sizes[dtype] = sum(f.stat().st_size for f in (tmp_path / dtype).glob("shard-*.tar"))
        assert json.loads((tmp_path / dtype / "cache.json").read_text())["data"]["dtype"] == dtype
        batch = one_batch(expand_urls(str(tmp_path / dtype / "shard-*.tar")), cached=True)
        floats = [batch["video_latents"], *(t for f in batch["features"].values() for t in f.values() if t.is_floating_point())]
        assert {t.dtype for t in floats} == {getattr(torch, dtype)}
        cached = tiny_module(feature_cache=str(tmp_path / dtype))
        cached.load_state_dict(online.state_dict(), strict=False)
        losses[dtype] = seeded_loss(cached, batch)
        assert losses[dtype].dtype == torch.float32
    assert sizes["bfloat16"] < 0.6 * sizes["float32"]
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_shards(online, raw_shards, tmp_path / "x", SampleDecoder(**DECODER), dtype="float16")


def test_a_cache_trained_model_builds_its_encoders_to_sample_mid_fit(tmp_path):
    """attach_encoders gives a cache-built model the encoders without replacing the parameters the
    optimizer holds; it then samples exactly as the same weights built online do."""
    from callbacks import SamplingCallback
    from tests.helpers import synthetic_batch

    manifest = make_clips(tmp_path / "clips", count=2)
    pack(str(manifest), str(tmp_path / "raw"), num_frames=5, fps=8, progress=False)
    online = tiny_module()
    torch.nn.init.normal_(online.dit.head.proj.weight, std=0.5)
    torch.nn.init.normal_(online.conditioners["relational"].connector[2].weight, std=0.5)
    cache_shards(online, expand_urls(str(tmp_path / "raw" / "shard-*.tar")), tmp_path / "cache", SampleDecoder(**DECODER))
    cached = tiny_module(feature_cache=str(tmp_path / "cache"))
    cached.load_state_dict(online.state_dict(), strict=False)
    with pytest.raises(ValueError, match="feature cache.*give `requests`"):
        SamplingCallback(every_n_steps=1).on_train_start(None, cached)
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="sharded model"):
        SamplingCallback(every_n_steps=1, requests="r.jsonl").on_train_start(SimpleNamespace(strategy=FSDPStrategy()), cached)
    with pytest.raises(ValueError, match="feature_cache"):  # no encoders yet
        cached.generate(synthetic_batch(size=2, with_video=False))

    trainable = dict(cached.named_parameters())
    assert cached.attach_encoders() and not cached.attach_encoders()
    assert all(p is trainable[n] for n, p in cached.named_parameters() if n in trainable)
    assert any(isinstance(m, FrozenEncoder) for m in cached.modules())
    batch = synthetic_batch(size=2, with_video=False)
    assert torch.equal(cached.generate(batch), online.generate(batch))


def test_cache_cli_then_fit_from_the_cache_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest = make_clips(tmp_path / "clips", count=4)
    pack(str(manifest), str(tmp_path / "raw"), num_frames=5, fps=8, samples_per_shard=2, progress=False)
    args = ["cache", "-c", TINY, "-c", TINY_SHARDS, "--urls", str(tmp_path / "raw" / "shard-*.tar"),
            "--output", str(tmp_path / "cache"), "--no_progress"]
    main(args)
    assert "Cached 4 samples into 2 shard(s)" in capsys.readouterr().out
    main(args)  # an interrupted or repeated run skips what is done
    out = capsys.readouterr().out
    assert "Cached 0 samples into 0 shard(s)" in out and "(2 already there)" in out

    cli = run_cli(["fit", "-c", TINY, "-c", TINY_SHARDS, "-c", TINY_CACHED, "--model.feature_cache", str(tmp_path / "cache"),
                   "--data.init_args.urls", str(tmp_path / "cache" / "shard-*.tar"), "--trainer.max_steps", "3",
                   "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert not any(isinstance(m, FrozenEncoder) for m in cli.model.modules())

    # The cache-trained model samples: predict and the pipeline build the encoders the config names.
    from bindweave.inference.pipeline import BindWeavePipeline

    checkpoint = str(tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt")
    pipe = BindWeavePipeline.from_checkpoint(checkpoint)
    assert any(isinstance(m, FrozenEncoder) for m in pipe.model.modules())
    requests = tmp_path / "requests.jsonl"
    reference = ROOT / "examples" / "references" / "red_circle.png"
    requests.write_text(json.dumps({"id": "one", "prompt": "the red circle moves right", "references": [str(reference)],
                                    "num_frames": 5, "height": 32, "width": 32}) + "\n")
    run_cli(["predict", "-c", TINY, "-c", TINY_SHARDS, "-c", TINY_CACHED, "-c", str(ROOT / "configs" / "predict.yaml"),
             "--data.init_args.requests", str(requests), "--ckpt_path", checkpoint,
             "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "outputs" / "tiny" / "videos" / "one.mp4").is_file()
