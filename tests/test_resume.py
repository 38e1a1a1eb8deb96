"""Exact resume (issue 18, item 10): a run interrupted and resumed from its checkpoint ends with the
weights of the uninterrupted run, and every training datamodule reads, after a resume, exactly the
batches (samples, crops, augmentations) it would have read, across ranks and DataLoader workers."""

import hashlib
import io
import itertools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from lightning.pytorch.callbacks import Callback

from bindweave.cli.app import run_cli
from bindweave.data.curriculum import Stage
from bindweave.data.datamodule import WebDataModule
from bindweave.data.memory import FeatureStore, MemoryCacheDataModule
from bindweave.data.resume import TrainPosition
from bindweave.tasks.sprites.scenes import generate
from bindweave.data.synthetic import SyntheticDataModule
from tests.data_helpers import TINY, TINY_SHARDS, make_video, raw_sample, write_tar

ROOT = Path(__file__).resolve().parents[1]
SPRITES = ROOT / "configs" / "sprites.yaml"


# -- through the CLI ------------------------------------------------------------------------------


class Recorder(Callback):
    """Records (global step, sample ids) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[str]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, list(batch["id"])))


def fit(folder: Path, monkeypatch, args: list[str]):
    """``bindweave fit`` in ``folder`` (the configs write under ./outputs): (cli, trainable weights,
    (step, ids) of the batches trained)."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    cli = run_cli(["fit", *args])
    weights = {k: v.detach().clone() for k, v in cli.model.named_parameters() if v.requires_grad}
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Recorder")  # the CLI imports tests.test_resume
    return cli, weights, recorder.seen


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_resumes_exactly(tmp_path: Path, monkeypatch, config: list[str], steps: int, preempted: bool) -> None:
    """``steps`` steps in one go end with the weights of half the steps, then resumed from
    ``last.ckpt``; with ``preempted``, also of a run resumed from the uninterrupted run's half-way
    checkpoint (a job killed after it). Each trains the same batches at the same steps."""
    half = str(steps // 2)
    common = [*config, "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              "--trainer.callbacks+=tests.test_resume.Recorder"]  # configs/tiny.yaml names callbacks.StepSeed
    midway = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", "midway",
              "--trainer.callbacks.every_n_train_steps", half, "--trainer.callbacks.save_top_k", "-1"] if preempted else []
    _, expected, seen = fit(tmp_path / "whole", monkeypatch, [*common, *midway, "--trainer.max_steps", str(steps)])

    _, halfway, first = fit(tmp_path / "stopped", monkeypatch, [*common, "--trainer.max_steps", half])
    last = next(Path("outputs").rglob("last.ckpt")).resolve()
    cli, stopped, second = fit(tmp_path / "stopped", monkeypatch,
                               [*common, "--trainer.max_steps", str(steps), "--ckpt_path", str(last)])
    assert cli.trainer.global_step == steps and first + second == seen
    assert max_difference(expected, halfway) > 0  # the second half trained
    assert max_difference(expected, stopped) == 0.0  # the issue measured 0.0128 after 10 + 10 steps
    assert all(torch.equal(value, stopped[name]) for name, value in expected.items())
    if preempted:
        checkpoint = next((tmp_path / "whole" / "midway").glob(f"*step={half}.ckpt"))
        _, resumed, third = fit(tmp_path / "preempted", monkeypatch,
                                [*common, "--trainer.max_steps", str(steps), "--ckpt_path", str(checkpoint)])
        assert third == seen[len(first):]
        assert all(torch.equal(value, resumed[name]) for name, value in expected.items())


def test_tiny_config_resumes_exactly(tmp_path, monkeypatch):
    """The issue's case: configs/tiny.yaml (synthetic data), validating after every step; stopped
    by max_steps and resumed from last.ckpt, and resumed from a checkpoint taken mid-epoch."""
    assert_resumes_exactly(tmp_path, monkeypatch, ["-c", TINY, "--trainer.val_check_interval", "1",
                                                   "--trainer.limit_val_batches", "1"], steps=2, preempted=True)


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory) -> list[str]:
    """4 shards of 4 clips, 32x48 and 48x32 in turn (two size buckets: batches wait for a second clip)."""
    folder = tmp_path_factory.mktemp("two-sizes")
    videos = [make_video(folder / "wide.mp4").read_bytes(), make_video(folder / "tall.mp4", height=48, width=32).read_bytes()]
    return [str(write_tar(folder / f"shard-{s:06d}.tar", [raw_sample(f"s{s}-{i}", videos[(s + i) % 2], refs=1 + i % 2)
                                                          for i in range(4)])) for s in range(4)]


def test_webdataset_resumes_exactly_with_workers_and_gradient_accumulation(two_sizes, tmp_path, monkeypatch):
    """configs/data/tiny-shards.yaml: 2 workers, 3 buckets, random crops and reference augmentation."""
    config = ["-c", TINY, "-c", TINY_SHARDS, "--data.init_args.urls", str(Path(two_sizes[0]).parent / "shard-*.tar"),
              "--data.init_args.samples_per_epoch", "12", "--trainer.accumulate_grad_batches", "2",
              "--trainer.limit_val_batches", "0"]
    assert_resumes_exactly(tmp_path, monkeypatch, config, steps=2, preempted=False)


# -- datamodules, rank by rank --------------------------------------------------------------------


def trainer_of(rank: int, ranks: int) -> SimpleNamespace:
    """What the datamodules read of a Trainer on data-parallel rank ``rank`` of ``ranks`` (the
    position is saved as by one process: gathering ranks is tested below)."""
    return SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"rank": rank, "num_replicas": ranks}),
                           global_step=0, accumulate_grad_batches=1, training=True, callbacks=[], world_size=1,
                           global_rank=0)


def fingerprint(batch: dict) -> tuple:
    """Sample ids and a digest of every tensor (pixels after crops and augmentation, features)."""
    digest = hashlib.sha1()

    def add(value) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                add(value[key])
        elif isinstance(value, torch.Tensor):
            digest.update(value.cpu().contiguous().numpy().tobytes())

    add(batch)
    return tuple(batch["id"]), digest.hexdigest()


def train(make, rank: int, ranks: int, runs: list[int]) -> list[tuple]:
    """Fingerprints of rank ``rank``'s training batches, read in runs of ``runs[i]`` batches: each
    run by a new datamodule that loads the checkpoint state (torch.save/load) of the previous one,
    as the Trainer does (a new DataLoader iteration whenever one ends: epochs)."""
    seen, state = [], None
    for count in runs:
        module = make()
        module.trainer = trainer_of(rank, ranks)
        if state is not None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            module.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        module.trainer.global_step = module.position.batches  # restored by the Trainer (one batch per step)
        taken = 0
        while taken < count:  # epoch after epoch
            loader = module.train_dataloader()
            batches = iter(loader)
            for batch in itertools.islice(batches, count - taken):
                module.on_before_batch_transfer(batch, 0)
                module.trainer.global_step += 1
                seen.append(fingerprint(batch))
                taken += 1
        if getattr(loader, "num_workers", 0) and finite(loader):
            for _ in batches:  # the epoch's other batches: workers left with full queues take seconds to stop
                pass
        state = module.state_dict()
    return seen


def finite(loader) -> bool:
    try:
        return len(loader) >= 0
    except TypeError:  # an endless stream
        return False


def assert_continues_exactly(make, ranks: int = 2, runs: tuple = (3, 4, 5)) -> list[list[tuple]]:
    """Interrupted twice and resumed == uninterrupted, on every rank; returns each rank's batches."""
    per_rank = []
    for rank in range(ranks):
        whole = train(make, rank, ranks, [sum(runs)])
        assert train(make, rank, ranks, list(runs)) == whole, f"rank {rank}"
        per_rank.append(whole)
    return per_rank


@pytest.mark.parametrize("workers", [0, 2])
def test_synthetic_continues_exactly_and_splits_each_pass_over_ranks(workers):
    make = lambda: SyntheticDataModule(num_samples=12, batch_size=2, num_workers=workers, height=16, width=16)  # noqa: E731
    per_rank = assert_continues_exactly(make)  # 12 batches: 4 passes of 3 batches per rank
    for start in range(0, 12, 3):
        ids = [i for batches in per_rank for batch in batches[start:start + 3] for i in batch[0]]
        assert len(set(ids)) == 12, ids  # every sample once per pass over both ranks
    assert per_rank[0][:3] != per_rank[0][3:6]  # and each pass in another order


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict[str, list[str]]:
    """Sets "a" and "b" of 4 shards x 4 clips each, 2 of each size per shard."""
    folder = tmp_path_factory.mktemp("sets")
    videos = [make_video(folder / "wide.mp4").read_bytes(), make_video(folder / "tall.mp4", height=48, width=32).read_bytes()]
    return {name: [str(write_tar(folder / f"{name}-{s:06d}.tar", [raw_sample(f"{name}{s}-{i}", videos[(s + i) % 2])
                                                                  for i in range(4)])) for s in range(4)] for name in "ab"}


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_continues_exactly_across_stages_epochs_buckets_and_mixtures(two_sets, workers):
    """Two ranks: a pooled stage for 5 steps, then "a" and "b" mixed by weight; data epochs of 4
    batches per rank; two buckets (samples wait at checkpoints); random crops and augmentation."""
    curriculum = [Stage(urls=two_sets["a"], steps=5), Stage(urls=[two_sets["a"], two_sets["b"]], weights=[1.0, 2.0])]
    make = lambda: WebDataModule(curriculum=curriculum, num_frames=5, fps=8, buckets=[(32, 48), (48, 32)],  # noqa: E731
                                 batch_size=2, samples_per_epoch=16, num_workers=workers, shuffle_buffer=4, seed=3)
    per_rank = assert_continues_exactly(make, runs=(3, 2, 5, 3))
    first_epoch = [i for batches in per_rank for batch in batches[:4] for i in batch[0]]
    assert len(set(first_epoch)) == len(first_epoch) == 16  # both ranks, one pass of stage 0: no sample twice


def test_webdataset_state_survives_a_change_of_workers_with_a_warning(two_sets, caplog):
    make = lambda workers: WebDataModule(urls=two_sets["a"], num_frames=5, fps=8, buckets=[(32, 48), (48, 32)],  # noqa: E731
                                         batch_size=2, num_workers=workers, shuffle_buffer=4)
    module = make(2)
    module.trainer = trainer_of(0, 1)
    for batch in itertools.islice(module.train_dataloader(), 3):
        module.on_before_batch_transfer(batch, 0)
    other = make(1)
    other.trainer = trainer_of(0, 1)
    other.load_state_dict(module.state_dict())
    with caplog.at_level("WARNING"):
        batch = next(iter(other.train_dataloader()))
    assert batch["resume"]["position"] == 3 and "not sample for sample" in caplog.text


@pytest.fixture(scope="module")
def sprites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sprites") / "train"
    generate(out, "train", 12, samples_per_shard=2, requests=False)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_sprites_config_data_continues_exactly(sprites, workers):
    """configs/sprites.yaml's data (an endless stream, one bucket), with smaller batches."""
    data = yaml.safe_load(SPRITES.read_text())["data"]["init_args"]
    data.update(urls=str(sprites / "shard-*.tar"), val_urls=None, batch_size=2, num_workers=workers, pin_memory=False,
                worker_start_method=None, shuffle_buffer=4)
    assert_continues_exactly(lambda: WebDataModule(**data), runs=(3, 4, 5))


def test_in_memory_data_continues_exactly():
    """bindweave.data.memory (configs/sprites/in-memory.yaml), from a store of made-up features."""
    samples = [dict(id=f"m{i}", prompt=f"p{i}", shard="s", fps=8, num_references=1, height=16, width=16,
                    video_latents=torch.full((4, 2, 2, 2), float(i)), features={"relational": {"tokens": torch.rand(3 + i % 2, 8)}})
               for i in range(10)]
    store = FeatureStore(samples)

    def make():
        module = MemoryCacheDataModule(urls="unused", batch_size=2, device="cpu")
        module.train_store = store
        return module

    per_rank = assert_continues_exactly(make, runs=(3, 4, 5))
    ids = [i for batches in per_rank for batch in batches[:2] for i in batch[0]]
    assert len(set(ids)) == 8  # one pass over both ranks (10 samples: 2 whole batches each, 2 wait a pass)


# -- ranks in one checkpoint ----------------------------------------------------------------------


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))
    position = TrainPosition()
    position.batches = 7
    position.streams = {0: {"position": 6, "stream": 0, "state": {"rank": rank}}}
    state = position.state_dict(SimpleNamespace(world_size=world))  # on every rank, as Lightning dumps checkpoints
    restored = TrainPosition()
    restored.load_state_dict(state, SimpleNamespace(world_size=world, global_rank=rank))
    torch.save({"state": state, "restored": restored.streams}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_the_checkpoint_holds_every_ranks_position(tmp_path):
    from tests.test_distributed import _free_port

    for attempt in range(3):  # forked, not spawned: no second import of the test's modules
        try:
            mp.start_processes(_gather_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, start_method="fork")
            break
        except mp.ProcessRaisedException as error:  # the port was taken between choosing and binding it
            if "address already in use" not in str(error).lower() or attempt == 2:
                raise
    for rank in range(2):
        saved = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        assert [r["streams"][0]["state"]["rank"] for r in saved["state"]["ranks"]] == [0, 1]
        assert saved["restored"][0]["state"] == {"rank": rank}
    with pytest.warns(UserWarning, match="saved by 2 rank"):
        TrainPosition().load_state_dict(saved["state"], SimpleNamespace(world_size=1, global_rank=0))
