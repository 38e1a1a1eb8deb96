"""FSDP2 sharding of a built BindWeave model, applied from outside the model code.

``BindWeave.configure_model`` calls :func:`shard_model` when the Trainer's strategy gives the module
a device mesh (Lightning's ``ModelParallelStrategy``): one ``fully_shard`` unit per DiT block, then
the DiT root, one unit per trainable conditioner part (the relational connector: its gradients are
reduced across ranks like the DiT's, and gradient clipping sees only DTensors), and (optionally) one
unit per frozen encoder, so a 14B DiT's weights, gradients and Adam state are split across the
data-parallel ranks. Mixed precision is FSDP2's
``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction by default).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from encoders.base import FrozenEncoder, resolve_dtype


def shard_model(
    dit: nn.Module,
    encoders: list[nn.Module],
    mesh: DeviceMesh,
    param_dtype: str | None = "bfloat16",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    shard_encoders: bool = True,
    gradient_divide_factor: float | None = None,
    trainable: list[nn.Module] = (),
) -> None:
    """Shard ``dit`` (per block, then root) and the frozen ``encoders`` over ``mesh``, in place.

    Args:
        dit: the trainable DiT (its ``blocks`` become FSDP units).
        encoders: frozen encoders; each becomes one FSDP unit if ``shard_encoders`` (weights
            gathered only while it runs), else it stays replicated on every rank.
        mesh: 1-D data-parallel device mesh (``LightningModule.device_mesh``, dimension
            ``data_parallel`` if the mesh is 2-D).
        param_dtype: dtype the DiT computes in (None: its storage dtype).
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free gathered block weights after forward (ZeRO-3); False keeps
            them until backward (ZeRO-2-like, more memory, less communication).
        shard_encoders: shard the frozen encoders too.
        gradient_divide_factor: divide the summed gradients by this instead of the mesh size
            (sequence parallelism: the mesh spans dp × sp ranks, whose sum over an SP group is one
            data-parallel rank's gradient, so the mean is over the dp size).
        trainable: further trainable modules (:func:`trainable_parts` of the conditioners), one unit
            each with the DiT's policy. Left unsharded, their gradients would not be reduced across
            ranks, and ``clip_grad_norm_`` fails on a mix of Tensors and DTensors.
    """
    if mesh.ndim > 1:
        mesh = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(
        param_dtype=resolve_dtype(param_dtype) if param_dtype else None, reduce_dtype=resolve_dtype(reduce_dtype)
    )
    for block in dit.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(dit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for part in trainable:
        fully_shard(part, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if gradient_divide_factor is not None:
        for unit in [*dit.blocks, dit, *trainable]:
            unit.set_gradient_divide_factor(gradient_divide_factor)
            unit.set_force_sum_reduction_for_comms(True)  # a plain sum then a division: gloo has no PREMUL_SUM
    if shard_encoders:
        for encoder in encoders:
            if not isinstance(encoder, FrozenEncoder):
                raise TypeError(f"Only frozen encoders are sharded here, got {type(encoder).__name__}.")
            # Frozen: computes in its own dtype; nothing to reduce.
            fully_shard(encoder, mesh=mesh, reshard_after_forward=True)
            # Entry points other than forward (the VAE's encode/decode) must gather weights too.
            for method in ("encode", "encode_images", "decode"):
                if callable(getattr(encoder, method, None)):
                    register_fsdp_forward_method(encoder, method)


def trainable_parts(conditioners: nn.ModuleDict) -> list[nn.Module]:
    """The outermost submodules of each conditioner that hold trainable weights and no frozen
    encoder (e.g. ``relational.connector``, or a trained encoder: ``model.train_encoders``): the
    units :func:`shard_model` shards beside the DiT.
    Never a conditioner itself: conditioners run through ``condition``, not ``forward``, so FSDP's
    forward hooks would not gather their weights."""

    def within(module: nn.Module) -> list[nn.Module]:
        parts = []
        for child in module.children():
            if not any(p.requires_grad for p in child.parameters()):
                continue
            holds_encoder = any(isinstance(m, FrozenEncoder) and not m.trainable for m in child.modules())
            parts += within(child) if holds_encoder else [child]
        return parts

    return [part for conditioner in conditioners.values() for part in within(conditioner)]
