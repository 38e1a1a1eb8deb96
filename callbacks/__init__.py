"""Pluggable Lightning callbacks (name them under ``trainer.callbacks`` in a config)."""

from bindweave.data.datamodule import DataMonitor
from callbacks.checkpoint import RunCheckpoint
from callbacks.denoise_probe import DenoiseProbe
from callbacks.ema import EMA
from callbacks.loss_progress import LossProgressBar
from callbacks.metrics import CLIPTextImageModel, IdentitySimilarity, MotionMagnitude, PromptVideoSimilarity, VideoMetrics
from callbacks.resume import StepSeed
from callbacks.predict_progress import PredictProgress
from callbacks.sampling import SamplingCallback
from callbacks.schedule import LRSchedule
from callbacks.throughput import TrainingThroughput
from callbacks.video_writer import VideoWriter

__all__ = [
    "CLIPTextImageModel",
    "DataMonitor",
    "DenoiseProbe",
    "EMA",
    "IdentitySimilarity",
    "LRSchedule",
    "LossProgressBar",
    "MotionMagnitude",
    "PredictProgress",
    "PromptVideoSimilarity",
    "RunCheckpoint",
    "SamplingCallback",
    "StepSeed",
    "TrainingThroughput",
    "VideoMetrics",
    "VideoWriter",
]
