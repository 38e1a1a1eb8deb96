"""Multi-process training on the CPU (gloo): DDP and FSDP2 steps equal one process on the full batch."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from bindweave.data.synthetic import SyntheticSubjects
from bindweave.model.batch import collate
from tests.helpers import tiny_module
from tests.tiny_parts import tiny, tiny_factory

LR = 1e-3


def per_sample_loss(module, batch):
    """Loss of a batch as the mean of per-sample losses, each with noise fixed by the sample's seed
    (so a sample's loss does not depend on which rank computes it)."""
    losses = []
    for i in range(len(batch["prompt"])):
        sample = {k: (v[i : i + 1] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}
        generator = torch.Generator().manual_seed(int(sample["seed"][0]))
        losses.append(module.flow_loss(sample, generator=generator))
    return torch.stack(losses).mean()


T5 = "conditioners.relational.text_encoder"


def build(train_encoders=None, **parallelism):
    from bindweave.training.module import ParallelismConfig

    torch.manual_seed(0)
    module = tiny_module(parallelism=ParallelismConfig(**parallelism), train_encoders=train_encoders)
    for c in module.conditioners.values():
        c.dropout = 0.0
    if train_encoders:
        live_head(module)
    return module


def live_head(module) -> None:
    """A non-zero DiT head, the same in every process: gradients then reach every part (the DiT's
    zero-initialised head passes none back)."""
    weight = module.dit.head.proj.weight
    with torch.no_grad():
        weight.copy_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(7)))


def dataset():
    return SyntheticSubjects(2, num_frames=5, height=32, width=32, max_references=2, seed=0)


def reference_step(train_encoders=None):
    """One process, full batch of 2: the loss, the DiT's and the text encoder's weights after one step."""
    module = build(train_encoders)
    torch.manual_seed(0)  # connector and DiT init happen in build; same for every rank
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
    loss = per_sample_loss(module, collate([dataset()[0], dataset()[1]]))
    loss.backward()
    optimizer.step()
    t5 = module.conditioners["relational"].text_encoder
    return loss.detach(), {k: v.detach().clone() for k, v in module.dit.state_dict().items()}, \
        {k: v.detach().clone() for k, v in t5.state_dict().items()}


def _worker(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.utils.data import DataLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)

    class Step(type(build())):
        def training_step(self, batch, batch_idx):
            loss = per_sample_loss(self, batch)
            self.log("loss", loss, sync_dist=True, batch_size=1)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)

    if strategy == "ddp":
        module = build()
        module.__class__ = Step
        chosen = DDPStrategy(process_group_backend="gloo")
    else:
        from functools import partial

        from bindweave.model.dit import WanDiT
        from bindweave.training.module import ParallelismConfig
        from conditioners import IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
        from encoders import WanVAE
        from tests.helpers import TINY_DIT

        class Sharded(Step):
            def _apply_parallelism(self):
                if self.train_encoders:
                    live_head(self)  # before sharding, as build() does
                super()._apply_parallelism()

        torch.manual_seed(0)
        module = Sharded(dit=partial(WanDiT, **TINY_DIT), vae=tiny_factory(WanVAE), relational=tiny(RelationalConditioner),
                         identity=tiny(IdentityConditioner), multi_reference=tiny(MultiReferenceConditioner),
                         parallelism=ParallelismConfig(fsdp_param_dtype=None),
                         train_encoders=[T5] if strategy == "fsdp2-t5" else None)
        for c in module.conditioners.values():
            c.dropout = 0.0
        chosen = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=chosen, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(dataset(), batch_size=1, collate_fn=collate)
    trainer.fit(module, loader)
    def full(part):
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in part.state_dict().items()}

    state, t5 = full(module.dit), full(module.conditioners["relational"].text_encoder)
    if rank == 0:
        torch.save({"loss": trainer.callback_metrics["loss"], "dit": state, "t5": t5}, out)
    # Leave together, then skip the interpreter's teardown: in fresh-clone CI runs rank 1 sometimes
    # aborted *after* this point ("terminate called without an active exception", SIGABRT: a C++
    # thread still joinable when static destructors ran), with the barrier and the destroyed group
    # in place. Everything this worker has to say is on disk (rank 0's torch.save) by now.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world: int, *args) -> None:
    """Run ``worker(rank, world, port, *args)`` on ``world`` spawned ranks. The port is free when
    chosen but another process can take it before rank 0 binds it: that start is retried on a new port."""
    for attempt in range(3):
        try:
            mp.start_processes(worker, args=(world, _free_port(), *args), nprocs=world, join=True, start_method="spawn")
            return
        except mp.ProcessRaisedException as error:
            if "address already in use" not in str(error).lower() or attempt == 2:
                raise


def _rendezvous_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))
    if rank == 0:
        torch.save(port, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # holds a port for a full retry cycle (~20 s): `pytest -m slow`
def test_spawn_retries_a_port_taken_before_rank_zero_binds_it(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], _free_port()])
        monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: next(ports))
        _spawn(_rendezvous_worker, 2, str(tmp_path / "port.pt"))
        assert torch.load(tmp_path / "port.pt", weights_only=True) != taken.getsockname()[1]


# The default run keeps fsdp2-t5 (every part gets gradients, T5 trains); fsdp2 and ddp: `pytest -m slow`.
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), pytest.param("fsdp2", marks=pytest.mark.slow),
                                      "fsdp2-t5"])
def test_two_ranks_match_one_process(strategy, tmp_path):
    """One step on two ranks equals one process on the whole batch; ``fsdp2-t5`` also trains the
    text encoder (``model.train_encoders``: its own FSDP unit, gradients reduced over the ranks)."""
    if strategy.startswith("fsdp2") and torch.__version__ < "2.6":
        pytest.skip("FSDP2 fully_shard needs torch >= 2.6")
    out = str(tmp_path / "rank0.pt")
    _spawn(_worker, 2, strategy, out)
    result = torch.load(out, weights_only=True)
    # The reference must build the same initial weights: build() seeds before configure_model.
    loss, expected, t5 = reference_step([T5] if strategy == "fsdp2-t5" else None)
    torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
    for key, value in expected.items():
        torch.testing.assert_close(result["dit"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in t5.items():
        torch.testing.assert_close(result["t5"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    if strategy == "fsdp2-t5":  # the encoder took Adam steps (~LR each), not only AdamW's weight decay
        start = build().conditioners["relational"].text_encoder.state_dict()["model.shared.weight"]
        assert (t5["model.shared.weight"] - start * (1 - LR * 0.01)).abs().max() > 0.5 * LR


def _sp_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    from bindweave.parallel.sequence import batch_parallel_forward, sequence_parallel_forward, ulysses_attention
    from tests.test_dit import inputs, tiny_dit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    torch.manual_seed(0)
    dit = tiny_dit()
    x, t, ctx = inputs(dit, frames=4)  # 4 · 4 · 6 = 96 tokens
    x.requires_grad_(True)
    frame_mask = torch.tensor([[True, True, True, False], [True] * 4])
    results = {}
    # Raw kernel: each rank's rows of full attention.
    q, k, v = (torch.randn(2, 8, 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(9)) > 0.3
    rows = slice(rank * 4, rank * 4 + 4)
    results["kernel"] = ulysses_attention(q[:, rows], k[:, rows], v[:, rows], mask, group=group)
    # Whole model, forward and input gradient.
    out = sequence_parallel_forward(dit, group, x, t, ctx, frame_mask=frame_mask)
    out.square().mean().backward()
    # Replicated inputs (and parameters) get each rank's share of the gradient: the sum over the
    # group is the full gradient (in training, the data-parallel all-reduce spans the SP group too).
    dist.all_reduce(x.grad, group=group)
    results["sp_out"], results["sp_grad"] = out.detach(), x.grad.detach()
    with torch.no_grad():
        results["cfg_out"] = batch_parallel_forward(dit, group, x, t, ctx, frame_mask=frame_mask)
    # Whole sampling runs: every rank gets the same requests and the same videos.
    from dataclasses import replace

    from bindweave.inference.sampler import sample_videos
    from tests.helpers import synthetic_batch, tiny_module

    torch.manual_seed(123)
    module = tiny_module(num_steps=2)
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)  # outputs depend on the DiT
    batch = synthetic_batch(size=1, with_video=False)
    for mode in ("cfg", "sequence"):
        results[f"video_{mode}"] = sample_videos(module.model, batch, replace(module.sampling, parallel=mode))
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


@pytest.mark.slow  # CI time: `pytest -m slow` runs it (tests/test_sequence_fit.py keeps sequence parallelism in the default run)
def test_sequence_and_cfg_parallel_equal_one_process(tmp_path):
    from tests.test_dit import inputs, tiny_dit
    from bindweave.model.attention import attention

    out = str(tmp_path / "sp.pt")
    _spawn(_sp_worker, 2, out)
    result = torch.load(out, weights_only=True)

    q, k, v = (torch.randn(2, 8, 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(9)) > 0.3
    torch.testing.assert_close(result["kernel"], attention(q, k, v, mask)[:, :4])

    torch.manual_seed(0)
    dit = tiny_dit()
    x, t, ctx = inputs(dit, frames=4)
    x.requires_grad_(True)
    frame_mask = torch.tensor([[True, True, True, False], [True] * 4])
    expected = dit(x, t, ctx, frame_mask=frame_mask)
    expected.square().mean().backward()
    # Every rank sees the full output; the summed input gradient is the full one.
    torch.testing.assert_close(result["sp_out"], expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["sp_grad"], x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result["cfg_out"], expected.detach(), rtol=1e-5, atol=1e-5)
    from tests.helpers import synthetic_batch, tiny_module
    from bindweave.inference.sampler import sample_videos

    torch.manual_seed(123)
    module = tiny_module(num_steps=2)
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)
    single = sample_videos(module.model, synthetic_batch(size=1, with_video=False), module.sampling)
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)  # other weights: another video
    assert (sample_videos(module.model, synthetic_batch(size=1, with_video=False), module.sampling).int() - single.int()).abs().max() > 1
    for mode in ("cfg", "sequence"):
        assert (result[f"video_{mode}"].int() - single.int()).abs().max() <= 1, mode


def _checkpoint_worker(rank: int, world: int, port: int, ckpt_dir: str, out: str, resume: bool) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from bindweave.training.module import ParallelismConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from functools import partial

    from bindweave.model.dit import WanDiT
    from bindweave.training.module import BindWeave
    from conditioners import IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
    from encoders import WanVAE
    from tests.helpers import TINY_DIT

    torch.manual_seed(rank + (10 if resume else 0))  # different init: the checkpoint must overwrite it
    module = BindWeave(dit=partial(WanDiT, **TINY_DIT), vae=tiny_factory(WanVAE), relational=tiny(RelationalConditioner),
                       identity=tiny(IdentityConditioner), multi_reference=tiny(MultiReferenceConditioner),
                       optimizer=partial(torch.optim.AdamW, lr=LR), parallelism=ParallelismConfig(fsdp_param_dtype=None))
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True)
    saver = ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1,
                        logger=False, callbacks=[saver], enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    loader = DataLoader(dataset(), batch_size=1, collate_fn=collate)
    if resume:
        # max_steps=1 was reached by the saved run: fit restores everything and trains no further.
        trainer.fit(module, loader, ckpt_path=os.path.join(ckpt_dir, "last.ckpt"))
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.dit.state_dict().items()}
        torch.save({"dit": state, "step": trainer.global_step}, out)
        return
    trainer.fit(module, loader)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.dit.state_dict().items()}
    if rank == 0:
        torch.save({"dit": state}, out)


@pytest.mark.slow  # CI time: `pytest -m slow` runs it (~40 s)
def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path):
    ckpt_dir, saved, restored = str(tmp_path / "ckpt"), str(tmp_path / "saved.pt"), str(tmp_path / "restored.pt")
    _spawn(_checkpoint_worker, 2, ckpt_dir, saved, False)
    assert os.path.isdir(os.path.join(ckpt_dir, "last.ckpt"))  # a distributed (sharded) checkpoint folder
    _spawn(_checkpoint_worker, 1, ckpt_dir, restored, True)
    before, after = torch.load(saved, weights_only=True), torch.load(restored, weights_only=True)
    assert after["step"] == 1
    for key, value in before["dit"].items():
        torch.testing.assert_close(after["dit"][key], value, msg=key)
    # The sharded folder consolidates, in one process, to the trainable weights only (for export).
    from bindweave.weights.export import read_sharded_checkpoint

    consolidated = read_sharded_checkpoint(os.path.join(ckpt_dir, "last.ckpt"))
    state = consolidated["state_dict"]
    assert not any(k.startswith("vae.") or ".text_encoder." in k or ".mllm." in k for k in state)
    assert any(".connector." in k for k in state)
    for key, value in before["dit"].items():
        torch.testing.assert_close(state[f"dit.{key}"], value, msg=key)


def _budget_worker(rank: int, world: int, port: int, out: str) -> None:
    """A DDP fit under an ``LRSchedule`` budget where rank 1's clock runs at half rank 0's speed: each
    rank alone would plan another total; rank 0's estimates reach both, and both stop at its total."""
    import datetime

    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    import callbacks.schedule as schedule
    from callbacks.schedule import LRSchedule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    clock = [0.0]
    schedule.time.monotonic = lambda: clock[0]  # this spawned process's own clock

    class Tick(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock[0] += 0.1 * (rank + 1)  # rank 0: 10 steps/s, rank 1: 5 steps/s

    class Line(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    budget = LRSchedule(warmup_steps=2, budget=10.0, skip_steps=2, measure_steps=4, refine_until=0.5)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=30))  # ranks apart: fail
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy,
                        max_steps=10_000, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Tick(), budget])
    trainer.fit(Line(), DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4))
    torch.save({"step": trainer.global_step, "total": budget.total_steps, "final": budget.final}, f"{out}.{rank}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_a_budget_schedule_keeps_every_rank_on_rank_zeros_total(tmp_path):
    out = str(tmp_path / "budget")
    _spawn(_budget_worker, 2, out)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert ranks[0] == ranks[1]  # one total, one step at the end, fixed on both
    # Rank 0's clock: 10 s at 10 steps/s. Rank 1 alone would have planned ~50 steps.
    assert ranks[0]["final"] and 95 <= ranks[0]["step"] == ranks[0]["total"] <= 101
