"""What is applied to the model from outside it: activation checkpointing and ``torch.compile`` per
block (``per_block``), FSDP2 sharding (``fsdp``) and Ulysses sequence parallelism (``sequence``)."""

from bindweave.parallel import per_block as _per_block
from bindweave.parallel.per_block import ATTENTION_OPS, MATMUL_OPS, apply_activation_checkpointing, apply_compile

__all__ = ["ATTENTION_OPS", "MATMUL_OPS", "apply_activation_checkpointing", "apply_compile"]


def __getattr__(name: str):  # ``bindweave.parallel`` was the module ``bindweave.parallel.per_block`` is now
    try:
        return getattr(_per_block, name)
    except AttributeError:
        raise AttributeError(f"module 'bindweave.parallel' has no attribute {name!r}") from None
