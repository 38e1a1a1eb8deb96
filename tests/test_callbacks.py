"""Sampling and metric callbacks: they log on a tiny fit, measure what they say, stay on rank zero."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bindweave.cli.app import run_cli
from callbacks import (CLIPTextImageModel, IdentitySimilarity, MotionMagnitude, PromptVideoSimilarity, SamplingCallback,
                       VideoMetrics)
from tests.pipeline_helpers import ROOT, TINY, cli_module, tiny_model_config
from tests.tiny_parts import tiny


def test_sampling_and_metric_callbacks_log_on_a_tiny_fit(tmp_path, monkeypatch):
    import callbacks.metrics as metrics_module

    monkeypatch.chdir(tmp_path)
    # What VideoMetrics measured (its requests, the frames it gave the CLIP), to recompute its metric.
    seen = {"requests": [], "images": []}

    def recording(function, key):
        def wrapper(*args):
            seen[key].append(function(*args))
            return seen[key][-1]
        return wrapper

    monkeypatch.setattr(metrics_module, "predict_batch_of", recording(metrics_module.predict_batch_of, "requests"))
    monkeypatch.setattr(metrics_module, "frames_to_images", recording(metrics_module.frames_to_images, "images"))
    cli = run_cli(["fit", "-c", str(TINY), "-c", str(ROOT / "configs" / "monitor.yaml"),
                   "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.num_sanity_val_steps", "0", "--model.sampling.num_steps", "2",
                   "--trainer.enable_progress_bar", "false"])
    log_dir = Path(cli.trainer.log_dir)
    step0 = log_dir / "samples" / "step-0000000"
    assert sorted(p.suffix for p in step0.iterdir()) == [".json", ".json", ".mp4", ".mp4", ".png", ".png"]
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    gifs = [t for t in events.Tags()["images"] if not t.endswith("/sheet")]
    assert len(gifs) == 2 and events.Images(gifs[0])[0].encoded_image_string.startswith(b"GIF89a")
    metrics = cli.trainer.callback_metrics
    assert 0.5 < metrics["val/identity_similarity"] <= 1.0 + 1e-5
    # val/prompt_similarity is the mean over the videos of the mean cosine of their frames to their prompt.
    clip = next(c for c in cli.trainer.callbacks if isinstance(c, VideoMetrics)).clip
    images = torch.cat(seen["images"])  # (B, F', 3, H, W)
    prompts = [prompt for requests in seen["requests"] for prompt in requests["prompt"]]
    assert len(prompts) == len(images) == 2
    frames = clip.encode_images(images.flatten(0, 1)).unflatten(0, images.shape[:2])  # (B, F', D)
    expected = F.cosine_similarity(frames, clip.encode_text(prompts)[:, None], dim=-1).mean()
    torch.testing.assert_close(metrics["val/prompt_similarity"].cpu(), expected, atol=1e-5, rtol=0)
    assert metrics["val/motion"] >= 0.0
    assert {"val/identity_similarity", "val/prompt_similarity", "val/motion"} <= set(events.Tags()["scalars"])


def test_motion_magnitude_follows_the_speed():
    def moving_square(speed: int) -> torch.Tensor:
        frames = torch.full((1, 5, 64, 64, 3), 128, dtype=torch.uint8)
        for t in range(5):
            frames[0, t, 24:40, 10 + speed * t : 26 + speed * t] = 250
        return frames

    values = []
    for speed in (0, 1, 3):
        metric = MotionMagnitude()
        metric.update(moving_square(speed))
        values.append(metric.compute().item())
    assert values[0] < 1e-3 < values[1] < values[2]


def test_similarity_metrics():
    identity = IdentitySimilarity()
    features = torch.randn(2, 3, 8)
    references = torch.cat([features[:, :1], torch.randn(2, 1, 8)], dim=1)  # second reference is padding
    identity.update(features[:, :1].expand(2, 4, 8), references, torch.tensor([[True, False], [True, False]]))
    torch.testing.assert_close(identity.compute(), torch.tensor(1.0))
    # Exact values on constructed features: frames · references cosines 1, 1/√2 (frame 1) and 0, 1/√2
    # (frame 2), the padded third reference ignored; a video without references does not count.
    identity = IdentitySimilarity()
    identity.update(torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [1.0, 0.0]]]),
                    torch.tensor([[[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]]),
                    torch.tensor([[True, True, False], [False, False, False]]))
    torch.testing.assert_close(identity.compute(), torch.tensor((1 + 2 * 0.5**0.5) / 4))
    # Prompt–video: video 1's frames at cosines 1 and 1/√2 to its prompt, video 2's at 1 and -1.
    prompt = PromptVideoSimilarity()
    prompt.update(torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, -1.0]]]),
                  torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    torch.testing.assert_close(prompt.compute(), torch.tensor((1 + 0.5**0.5) / 4))
    # Through a CLIP's image and text towers: the mean over videos of the mean frame–prompt cosine.
    prompt = PromptVideoSimilarity()
    clip = tiny(CLIPTextImageModel)
    frames = clip.encode_images(torch.rand(6, 3, 32, 32) * 2 - 1).view(2, 3, -1)
    text = clip.encode_text(["a red circle", "a blue square"])
    prompt.update(frames, text)
    torch.testing.assert_close(prompt.compute(), F.cosine_similarity(frames, text[:, None], dim=-1).mean())


def test_sampling_callback_runs_on_rank_zero_only_and_leaves_the_rng_alone(tmp_path):
    module = cli_module(tiny_model_config(num_steps=2))
    callback = SamplingCallback(every_n_steps=5, requests=str(ROOT / "examples" / "requests.jsonl"),
                                output_dir=str(tmp_path))
    trainer = SimpleNamespace(global_step=5, is_global_zero=False, strategy=None, loggers=[], log_dir=str(tmp_path))
    calls = []
    generate = module.generate
    module.generate = lambda *a, **k: (calls.append(1), generate(*a, **k))[1]
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert not calls and not list(tmp_path.iterdir())  # another rank: nothing generated or written
    trainer.is_global_zero, trainer.global_step = True, 10
    state = torch.get_rng_state()
    callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_train_batch_end(trainer, module, None, None, 1)  # same step again (gradient accumulation)
    assert len(calls) == 1 and torch.equal(torch.get_rng_state(), state)
    assert sorted(p.name for p in (tmp_path / "step-0000010").iterdir()) == [
        "red-blue.json", "red-blue.mp4", "red-blue.png", "red-left.json", "red-left.mp4", "red-left.png"]


def test_run_checkpoint_follows_the_root_not_the_logger(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger

    from callbacks import RunCheckpoint

    def fit(root, **checkpoint):
        callback = RunCheckpoint(save_last=True, enable_version_counter=False, **checkpoint)
        trainer = L.Trainer(default_root_dir=root, max_steps=2, logger=CSVLogger(tmp_path / "logs"), callbacks=[callback],
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(BoringModel())
        return callback

    fit(tmp_path / "run")
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()  # not logs/lightning_logs/version_0/checkpoints
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
    fit(tmp_path / "other", dirpath=tmp_path / "mine")  # an explicit dirpath still wins
    assert (tmp_path / "mine/last.ckpt").is_file() and not (tmp_path / "other/checkpoints").exists()


def test_sampling_callback_logs_to_each_logger_it_knows_and_leaves_files_for_the_others(tmp_path, monkeypatch):
    import sys

    import numpy as np
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from callbacks.sampling import log_video

    module = cli_module(tiny_model_config(num_steps=2))
    tensorboard, csv = TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv")
    callback = SamplingCallback(every_n_steps=1, requests=str(ROOT / "examples" / "requests.jsonl"))
    trainer = SimpleNamespace(global_step=3, is_global_zero=True, strategy=None, loggers=[csv, tensorboard],
                              log_dir=csv.log_dir, default_root_dir=str(tmp_path))
    callback.on_train_batch_end(trainer, module, None, None, 0)
    step = Path(csv.log_dir) / "samples" / "step-0000003"  # CSV (and no logger): the files under the log dir
    assert sorted(p.name for p in step.iterdir()) == [
        "red-blue.json", "red-blue.mp4", "red-blue.png", "red-left.json", "red-left.mp4", "red-left.png"]
    tensorboard.experiment.flush()
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/red-blue", "samples/red-blue/sheet", "samples/red-left",
                                               "samples/red-left/sheet"]
    assert events.Images("samples/red-left")[0].step == 3
    # W&B and MLflow through their loggers' public experiment objects (when installed).
    frames, sheet = torch.zeros(5, 8, 8, 3, dtype=torch.uint8), np.zeros((8, 16, 3), np.uint8)
    mp4 = step / "red-left.mp4"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x keeps the file store behind this switch
    for package, make in [("wandb", lambda: __import__("lightning.pytorch.loggers", fromlist=["WandbLogger"])
                           .WandbLogger(save_dir=str(tmp_path), offline=True)),
                          ("mlflow", lambda: __import__("lightning.pytorch.loggers", fromlist=["MLFlowLogger"])
                           .MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}"))]:
        if package not in sys.modules and __import__("importlib.util").util.find_spec(package) is None:
            continue
        logger = make()
        assert log_video(logger, "samples/red-left", frames, sheet, mp4, 3, 8) == package
        if package == "wandb":  # the offline run holds the video and the sheet as media files
            logger.experiment.finish()
            media = sorted(p.suffix for p in (tmp_path / "wandb").rglob("*") if p.is_file() and "media" in p.parts)
            assert ".mp4" in media and ".png" in media, media
        else:  # the artifacts of the run, under samples/step-0000003
            stored = sorted(p.name for p in (tmp_path / "mlruns").rglob("artifacts/samples/step-0000003/*"))
            assert stored == ["red-left.json", "red-left.mp4", "red-left.png"], stored
    assert log_video(csv, "samples/x", frames, sheet, mp4, 3, 8) == "files"  # W&B/MLflow above run only if installed



def test_the_loss_bar_shows_the_loss_without_making_it_a_per_step_bar_metric(tmp_path, monkeypatch):
    """Lightning reads prog_bar metrics off the device every step (a sync); the loss is not one, and
    LossProgressBar shows it from callback_metrics when it redraws."""
    from callbacks import LossProgressBar

    shown = []

    class Recording(LossProgressBar):
        def get_metrics(self, trainer, pl_module):
            shown.append((trainer.global_step, super().get_metrics(trainer, pl_module)))
            return shown[-1][1]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("callbacks.LossProgressBar", Recording)
    cli = run_cli(["fit", "-c", str(TINY), "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
                   "--trainer.callbacks+=callbacks.LossProgressBar", "--trainer.callbacks.refresh_rate=2"])
    assert "train/loss" not in cli.trainer.progress_bar_metrics  # not converted by Lightning each step
    during = [(step, items) for step, items in shown if "train/loss" in items]
    assert during and all(float(items["train/loss"]) > 0 for _, items in during)


def test_training_throughput_logs_rates_and_training_is_what_it_was_without_it(tmp_path, monkeypatch):
    """Samples/s and FLOP/s reach the logger every few steps; counting a step's FLOPs (an extra
    forward and backward) leaves the RNG and the gradients alone: the same weights as without it."""
    from callbacks import TrainingThroughput

    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", str(TINY), "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0", "--seed_everything", "3"]
    plain = run_cli(args + ["--trainer.default_root_dir", str(tmp_path / "plain")])
    timed = run_cli(args + ["--trainer.default_root_dir", str(tmp_path / "timed"), "--trainer.callbacks+=callbacks.TrainingThroughput",
                            "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.window=2", "--trainer.callbacks.count_at=1"])
    callback = next(c for c in timed.trainer.callbacks if isinstance(c, TrainingThroughput))
    assert callback.flops_per_batch and callback.flops_per_batch > 1e6
    last = callback.last
    assert last["throughput/device/samples_per_sec"] > 0 and last["throughput/batches"] == 6
    assert last["throughput/device/flops_per_sec"] == pytest.approx(
        callback.flops_per_batch * last["throughput/device/batches_per_sec"], rel=1e-6)
    assert "throughput/device/mfu" not in last  # no known peak for a CPU
    for (name, a), b in zip(plain.model.state_dict().items(), timed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_counting_a_steps_flops_puts_gradients_and_rng_back():
    from callbacks.throughput import count_training_flops
    from tests.helpers import synthetic_batch, tiny_module

    module = tiny_module()
    parameters = [p for p in module.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad for p in parameters]
    state = torch.get_rng_state()
    flops = count_training_flops(module, synthetic_batch(size=2))
    assert flops > 0 and torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is g and bool((g == 0.5).all()) for p, g in zip(parameters, grads))
