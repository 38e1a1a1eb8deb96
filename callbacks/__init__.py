"""Pluggable Lightning callbacks (name them under ``trainer.callbacks`` in a config)."""

from callbacks.video_writer import VideoWriter

__all__ = ["VideoWriter"]
