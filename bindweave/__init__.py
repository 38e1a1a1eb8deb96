"""BindWeave: subject-consistent video generation on PyTorch Lightning.

The package is layered; each subpackage imports only the ones above it in this list
(``tests/test_layers.py`` checks it):

- ``bindweave.model``: the single-device network (``dit``, ``attention``, ``flow``), the batch
  contract, and ``BindWeaveModel`` (DiT + VAE + conditioners), which training and sampling share.
- ``bindweave.weights``: checkpoint formats in one place (reader, diffusers/official Wan/BindWeave
  release layouts, exports, int8 quantisation).
- ``bindweave.parallel``: what is applied from outside the model (activation checkpointing and
  compile per block, FSDP2, Ulysses sequence parallelism).
- ``bindweave.data``: datasets and datamodules (webdataset shards, feature cache, in-memory, synthetic).
- ``bindweave.training``: the LightningModule (loss, condition dropout, optimiser, checkpoints).
- ``bindweave.inference``: the sampler, ``BindWeavePipeline``, trained-model loading, requests and outputs.
- ``bindweave.cli``: the ``bindweave`` command (``fit``/``predict``/``data``/``weights``/``eval``).
- ``bindweave.tasks.sprites``: the synthetic sprites task and its evaluation, apart from the core.

Modules that moved keep their old names (``bindweave.module``, ``bindweave.dit``, ...) for YAML
files and checkpoints: see :mod:`bindweave.moved`.
"""

from bindweave import moved as _moved
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.model.presets import PRESETS, wan_dit_preset

_moved.install()

__all__ = ["PRESETS", "BindWeavePipeline", "CrossAttentionBranch", "WanDiT", "wan_dit_preset"]


def __getattr__(name: str):
    if name == "BindWeavePipeline":  # imported on first use: it pulls in Lightning and the encoders
        from bindweave.inference.pipeline import BindWeavePipeline

        return BindWeavePipeline
    raise AttributeError(f"module 'bindweave' has no attribute {name!r}")
