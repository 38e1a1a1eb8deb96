"""Pluggable Lightning callbacks (name them under ``trainer.callbacks`` in a config)."""

from callbacks.metrics import CLIPTextImageModel, IdentitySimilarity, MotionMagnitude, PromptVideoSimilarity, VideoMetrics
from callbacks.sampling import SamplingCallback
from callbacks.video_writer import VideoWriter

__all__ = [
    "CLIPTextImageModel",
    "IdentitySimilarity",
    "MotionMagnitude",
    "PromptVideoSimilarity",
    "SamplingCallback",
    "VideoMetrics",
    "VideoWriter",
]
