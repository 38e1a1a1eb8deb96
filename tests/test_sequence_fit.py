"""Sequence parallelism in ``fit`` and LoRA under FSDP2, on CPU ranks (gloo): a training step's loss
and gradients equal one process on the full batch."""

from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import torch

from bindweave.model.batch import collate
from tests.test_distributed import _spawn, dataset, per_sample_loss

LR = 0.1  # plain SGD: the step is the gradient itself (Adam's first step would hide a wrong scale)


def make_module(cls, **options):
    from bindweave.model.dit import WanDiT
    from bindweave.training.lora import LoraConfig
    from bindweave.training.module import ParallelismConfig
    from conditioners import IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
    from encoders import WanVAE
    from tests.helpers import TINY_DIT
    from tests.tiny_parts import tiny, tiny_factory

    torch.manual_seed(0)
    lora = options.pop("lora", None)
    module = cls(dit=partial(WanDiT, **TINY_DIT), vae=tiny_factory(WanVAE), relational=tiny(RelationalConditioner),
                 identity=tiny(IdentityConditioner), multi_reference=tiny(MultiReferenceConditioner),
                 parallelism=ParallelismConfig(fsdp_param_dtype=None, **options),
                 lora=LoraConfig(rank=4, also_train=["conditioners.relational.connector"]) if lora else None)
    for c in module.conditioners.values():
        c.dropout = 0.0
    return module


def step_class():
    from bindweave.training.module import BindWeave

    class Step(BindWeave):
        """One SGD step on the per-sample losses; keeps the reduced gradients (full tensors)."""

        def training_step(self, batch, batch_idx):
            loss = per_sample_loss(self, batch)
            self.log("loss", loss, sync_dist=True, batch_size=1)
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                          for n, p in self.named_parameters() if p.grad is not None}

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)

    return Step


def reference(lora: bool):
    """One process, the full batch of 2, one SGD step: (loss, gradients, DiT weights after)."""
    module = make_module(step_class(), lora=lora)
    module.configure_model()
    loss = per_sample_loss(module, collate([dataset()[0], dataset()[1]]))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    return loss.detach(), grads, {k: v.detach().clone() for k, v in module.dit.state_dict().items()}


def _worker(rank: int, world: int, port: int, sequence: int, lora: bool, out: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    module = make_module(step_class(), lora=lora, sequence_parallel=sequence)
    data_parallel = world // sequence
    strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=sequence)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # Each data-parallel rank reads 2 / dp samples; the ranks of a sequence group read the same ones.
    trainer.fit(module, DataLoader(dataset(), batch_size=2 // data_parallel, collate_fn=collate))
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.dit.state_dict().items()}
    if rank == 0:
        torch.save({"loss": trainer.callback_metrics["loss"], "grads": module.grads, "dit": state}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/test_distributed.py::_worker


def check_against_one_process(out: str, lora: bool) -> None:
    result = torch.load(out, weights_only=True)
    loss, grads, dit = reference(lora)
    torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
    assert set(result["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in dit.items():
        torch.testing.assert_close(result["dit"][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sequence_parallel_fit_equals_one_process(world, tmp_path):
    """world 2: one sequence group of 2; world 4: 2 data-parallel × 2 sequence-parallel ranks."""
    out = str(tmp_path / "rank0.pt")
    _spawn(_worker, world, 2, False, out)
    check_against_one_process(out, lora=False)


@pytest.mark.slow  # CI time: `pytest -m slow` runs it (~11 s)
def test_lora_under_fsdp2_equals_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    _spawn(_worker, 2, 1, True, out)
    result = torch.load(out, weights_only=True)
    assert result["grads"] and all(".lora_" in n or ".connector." in n for n in result["grads"])
    check_against_one_process(out, lora=True)


def test_sequence_parallel_needs_the_mesh_axis():
    from bindweave.errors import UserError

    module = make_module(step_class(), sequence_parallel=2)
    with pytest.raises(UserError, match="tensor_parallel_size: 2"):
        module.configure_model()
