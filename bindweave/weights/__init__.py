"""Checkpoint formats, in one place: reading safetensors/torch files lazily (``loading``), the
diffusers, official Wan2.1 and BindWeave-release layouts, exports of trained models, int8 weights."""
