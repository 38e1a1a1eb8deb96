"""Issue #21's recipe (configs/sprites-reader.yaml): the learning-rate schedule, EMA weights, the
trainable prompt + reference reader, reference cropping and the scenes rendered while training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from bindweave.data.reference_crop import crop_to_subject, subject_boxes
from bindweave.tasks.sprites import scenes as S
from bindweave.tasks.sprites.online import OnlineSprites, draw_batch, draw_sample, render_frames
from callbacks.ema import EMA
from callbacks.schedule import LRSchedule, budget_seconds, lr_factor
from conditioners.reader import ReaderConditioner
from encoders.reader import BOS, PAD, PromptReferenceReader, WordTokenizer
from tests.tiny_parts import tiny

ROOT = Path(__file__).resolve().parents[1]


# -- schedule and EMA decay ----------------------------------------------------------------------


def test_lr_factor_warms_up_linearly_then_decays_to_the_floor():
    assert lr_factor(0, 4, 14) == pytest.approx(0.25)
    assert lr_factor(3, 4, 14) == pytest.approx(1.0)
    assert lr_factor(4, 4, 14) == pytest.approx(1.0)  # decay starts at 1
    assert lr_factor(9, 4, 14) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(9, 4, 14, min_factor=0.1) == pytest.approx(0.55)
    assert lr_factor(14, 4, 14, min_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(99, 4, 14, min_factor=0.1) == pytest.approx(0.1)  # held after the end
    assert lr_factor(9, 4, 14, decay="linear") == pytest.approx(0.5)
    assert lr_factor(6, 4, 14, decay="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(9, 4, 14, decay="constant") == 1.0


class _FakeFit:
    """A one-process trainer on a fake clock for ``LRSchedule``: ``run(callback, steps, seconds)``
    steps it (``seconds``: per step, or a function of the step); ``broadcasts`` records what rank 0 sent."""

    def __init__(self, monkeypatch, start: float = 0.0) -> None:
        from types import SimpleNamespace

        import callbacks.schedule as schedule

        self.clock = [start]
        monkeypatch.setattr(schedule.time, "monotonic", lambda: self.clock[0])
        self.group = {"lr": 1.0}
        self.broadcasts = []
        strategy = SimpleNamespace(broadcast=lambda value, src=0: self.broadcasts.append((value, src)) or value)
        self.trainer = SimpleNamespace(global_step=0, max_steps=-1, log_every_n_steps=1000, should_stop=False,
                                       optimizers=[SimpleNamespace(param_groups=[self.group])], strategy=strategy)
        self.module = SimpleNamespace(log=lambda *a, **k: None)

    def run(self, callback, steps, seconds_per_step) -> None:
        trainer = self.trainer
        for _ in range(steps):
            callback.on_train_batch_start(trainer, self.module, None, 0)
            self.clock[0] += seconds_per_step(trainer.global_step) if callable(seconds_per_step) else seconds_per_step
            trainer.global_step += 1
            callback.on_train_batch_end(trainer, self.module, None, None, 0)
            if trainer.should_stop:
                return


def test_budget_schedule_measures_the_rate_fixes_the_total_resumes_it_and_stops_there(monkeypatch):
    """A wall-clock budget becomes a step count at the measured rate (here 10 steps/s on a fake
    clock); the decay spans it, a resumed chunk keeps it from the checkpoint, and training stops at it."""
    fit = _FakeFit(monkeypatch, start=100.0)
    clock, group, broadcasts, trainer, module, run = fit.clock, fit.group, fit.broadcasts, fit.trainer, fit.module, fit.run

    callback = LRSchedule(warmup_steps=5, budget="00:00:01:40", skip_steps=10, measure_steps=20, min_factor=0.1,
                          refine_until=0.0)  # the first estimate is final
    assert callback.budget == 100.0 and budget_seconds(7.5) == 7.5 and budget_seconds("600") == 600.0  # the CLI's string
    callback.on_train_start(trainer, module)
    clock[0] += 5.0  # compilation before the first step counts against the budget
    run(callback, 10, 1.0)  # slow first steps: left out of the rate
    assert callback.total_steps is None and group["lr"] == 1.0  # warm-up over, total unknown: the base rate
    run(callback, 21, 0.1)  # the rate is read at the start of step 30
    # At step 30: 5 + 10 + 2 = 17 s spent, 83 s left at 10 steps/s make 830 more steps.
    assert callback.total_steps == 30 + 830
    assert broadcasts == [((860, True), 0)]  # rank 0's total reaches every rank
    run(callback, 399, 0.1)
    state = callback.state_dict()
    assert state["total_steps"] == 860 and state["spent_seconds"] == pytest.approx(17 + 40)

    resumed = LRSchedule(warmup_steps=5, budget=100.0, skip_steps=10, measure_steps=20, min_factor=0.1)
    resumed.load_state_dict(state)
    assert resumed.final  # fixed: a resumed chunk does not measure again
    resumed.on_train_start(trainer, module)
    resumed.on_train_batch_start(trainer, module, None, 0)
    assert group["lr"] == pytest.approx(lr_factor(430, 5, 860, "cosine", 0.1))
    run(resumed, 10_000, 0.5)  # a slower chunk: the total stays the one measured
    assert trainer.global_step == 860 and trainer.should_stop
    assert group["lr"] == pytest.approx(lr_factor(859, 5, 860, "cosine", 0.1))
    with pytest.raises(ValueError, match="budget"):
        LRSchedule(budget="1:00")
    with pytest.raises(ValueError, match="not both"):
        LRSchedule(budget=10, total_steps=100)


def test_budget_schedule_refines_its_total_from_the_later_steps_until_a_quarter_of_the_budget(monkeypatch):
    """The first steps timed mislead (here 5 steps/s, then 10 for good): the total is estimated again
    every ``measure_steps`` steps from the later half of the steps timed, fixed once ``refine_until``
    of the budget is spent, kept by a resumed chunk, and the run ends where the budget does."""
    fit = _FakeFit(monkeypatch)
    clock, broadcasts, trainer, module, run = fit.clock, fit.broadcasts, fit.trainer, fit.module, fit.run

    callback = LRSchedule(warmup_steps=5, budget=100.0, skip_steps=10, measure_steps=20, min_factor=0.1)
    callback.on_train_start(trainer, module)
    run(callback, 31, lambda step: 1.0 if step < 10 else 0.2 if step < 30 else 0.1)  # compile, 20 slow steps
    # At step 30: 14 s spent; 86 s left at 5 steps/s make 430 more: a first estimate, not final.
    assert callback.total_steps == 30 + 430 and not callback.final
    run(callback, 20, 0.1)  # at step 50 the later half (steps 30-50) ran at 10 steps/s; 84 s left
    assert callback.total_steps == 50 + 840 and not callback.final
    assert [final for (_, final), _ in broadcasts] == [False, False]
    run(callback, 100, 0.1)  # at step 150: 26 s spent (over a quarter): fixed, at 10 steps/s
    assert callback.final and callback.total_steps == 150 + 740
    assert broadcasts[-1] == ((890, True), 0) and not any(final for (_, final), _ in broadcasts[:-1])
    fixed = callback.total_steps
    state = callback.state_dict()
    assert state["final"] and state["total_steps"] == fixed
    resumed = LRSchedule(warmup_steps=5, budget=100.0, skip_steps=10, measure_steps=20, min_factor=0.1)
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer, module)
    count = len(broadcasts)
    run(resumed, 10_000, 0.1)
    assert trainer.global_step == fixed and len(broadcasts) == count  # not measured again
    assert clock[0] == pytest.approx(100.0)  # the budget's 100 s, compile and slow steps included
    # A checkpoint from before refining existed has no "final": its total is kept as fixed.
    old = LRSchedule(budget=100.0)
    old.load_state_dict({"total_steps": 123, "spent_seconds": 5.0})
    assert old.final and old.total_steps == 123
    with pytest.raises(ValueError, match="refine_until"):
        LRSchedule(budget=10, refine_until=1.5)


def test_ema_decay_warms_up_to_its_target():
    ema = EMA(decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(100_000) == 0.999
    assert EMA(decay=0.99, warmup=False).decay_at(0) == 0.99


# -- reference cropping --------------------------------------------------------------------------


class _Line(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))  # a buffer: copied into the average, not averaged

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Weights(L.Callback):
    """The weights after each optimizer step (before the EMA callback, which comes after it)."""

    def __init__(self) -> None:
        self.steps: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0:  # after an optimizer step (the first micro-batches of accumulation: none yet)
            self.steps[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("accumulate, start_step", [(1, 0), (2, 2)])
def test_ema_is_the_warmed_up_average_of_the_weights_once_per_optimizer_step(accumulate, start_step):
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=2)
    weights, ema = _Weights(), EMA(decay=0.9, start_step=start_step)
    module = _Line()
    trainer = L.Trainer(max_steps=6, accumulate_grad_batches=accumulate, callbacks=[weights, ema], accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    expected = None
    for step in sorted(weights.steps):  # optimizer steps 1..6
        update = step - 1 - start_step
        current = weights.steps[step]
        if update <= 0 or expected is None:
            expected = [w.clone() for w in current]
        else:
            d = ema.decay_at(update)
            expected = [d * e + (1 - d) * w for e, w in zip(expected, current)]
    assert sorted(weights.steps) == list(range(1, 7))
    for got, want in zip(module.parameters(), expected):  # after fit the model holds the average
        torch.testing.assert_close(got, want)
    assert module.calls == 6 * accumulate  # the buffer follows the raw model, not an average of it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_ema_update_never_waits_for_the_gpu():
    class Strict(EMA):  # a device-to-host sync inside the update raises
        def on_train_batch_end(self, *args) -> None:
            torch.cuda.set_sync_debug_mode("error")
            try:
                super().on_train_batch_end(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = L.Trainer(max_steps=3, callbacks=[Strict(decay=0.9)], accelerator="gpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Line(), data)
    assert trainer.global_step == 3


def test_crop_to_subject_finds_the_box_pads_it_square_and_resizes():
    image = torch.ones(1, 3, 32, 32)  # white
    image[0, :, 5:25, 10:20] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # red, 10 wide x 20 high
    assert subject_boxes(image).tolist() == [[10.0, 5.0, 20.0, 25.0]]
    crop = crop_to_subject(image, 8)  # a 20 x 20 square around the box: 2 red columns of 8 in the middle half
    assert crop.shape == (1, 3, 8, 8)
    green = crop[0, 1]  # -1 on the subject, 1 on the white (edges blend: bilinear at pixel centres)
    assert (green[1:7, 2:6] < 0).all() and (green[2:6, 3:5] < -0.99).all()
    torch.testing.assert_close(crop[0, :, :, 0], torch.ones(3, 8))  # padding is the white fill
    torch.testing.assert_close(crop[0, :, :, 7], torch.ones(3, 8))
    assert (green[:, 1] > 0.8).all() and (green[:, 6] > 0.8).all()
    # the same subject at another scale and place gives the same crop
    small = torch.ones(1, 3, 64, 64)
    small[0, :, 30:50, 40:50] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    torch.testing.assert_close(crop_to_subject(small, 8), crop)
    empty = torch.ones(2, 3, 16, 16)
    assert subject_boxes(empty).tolist() == [[0.0, 0.0, 16.0, 16.0]] * 2  # no subject: the whole image
    assert subject_boxes(torch.ones(1, 3, 12, 20)).tolist() == [[0.0, 0.0, 20.0, 12.0]]  # [x0, y0, x1=W, y1=H)


# -- the reader ----------------------------------------------------------------------------------


def test_word_tokenizer_starts_with_bos_and_maps_unknown_words():
    ids, mask = WordTokenizer(["on", "a", "teal", ","])(["On a teal background,", ""])
    assert ids[0].tolist() == [BOS, 3, 4, 5, 2, 6] and ids[1].tolist() == [BOS, PAD, PAD, PAD, PAD, PAD]
    assert mask.sum(1).tolist() == [6, 1]


def test_fixed_length_prompts_have_one_shape_and_the_same_tokens():
    torch.manual_seed(0)
    vocabulary = ["a", "red", "subject", "moves", "left", "the"]
    ragged = PromptReferenceReader(vocabulary, dim=16, num_heads=2, max_words=12, read_references=False)
    fixed = PromptReferenceReader(vocabulary, dim=16, num_heads=2, max_words=12, read_references=False, fixed_length=True)
    fixed.load_state_dict(ragged.state_dict())
    prompts = ["a red subject moves left", "the subject"]
    short, padded = (reader(reader.prepare(prompts, None, None)) for reader in (ragged, fixed))
    assert short.tokens.shape[1] == 6 and padded.tokens.shape[1] == 12  # the longest prompt vs max_words
    assert torch.equal(padded.mask[:, :6], short.mask) and not padded.mask[:, 6:].any()
    real = short.mask[..., None]  # the padding is masked: real tokens read the same
    torch.testing.assert_close(padded.tokens[:, :6] * real, short.tokens * real, atol=1e-5, rtol=1e-5)


def test_reader_conditioner_trains_its_reader_and_drops_to_the_null_prompt():
    c = tiny(ReaderConditioner)
    c.build(None)
    batch = {"prompt": ["the first subject on a background", "the second subject"],
             "references": torch.rand(2, 2, 3, 16, 16) * 2 - 1, "num_references": [2, 1]}
    features = c.encode(batch)
    assert features["crops"].shape == (2, 2, 3, 8, 8) and features["crop_mask"].tolist() == [[True, True], [True, False]]
    c.eval()
    out = c.condition(batch, features).context["text"]
    assert out.tokens.shape == (2, 7 + 2 * 4, 32)
    null = c.condition(batch, features, drop=[True, False]).context["text"]
    assert null.mask[0].sum() == 1 and torch.equal(null.mask[1], out.mask[1])  # `<s>` alone, no reference
    assert all(p.requires_grad for p in c.parameters()) and sum(p.numel() for p in c.parameters()) > 0
    out.tokens.sum().backward()
    assert c.reader.patch_embedding.weight.grad is not None  # references reach the tokens with gradients
    prompt_only = ReaderConditioner(reader=lambda: PromptReferenceReader(["the"], dim=16, num_heads=2, read_references=False))
    prompt_only.build(None)
    assert set(prompt_only.encode({"prompt": ["the"], "references": torch.zeros(1, 0, 3, 8, 8),
                                   "num_references": [0]})) == {"ids", "id_mask"}


# -- scenes rendered while training ---------------------------------------------------------------


def test_render_frames_is_the_cpu_renderer_bit_for_bit():
    config = OnlineSprites(num_frames=5, height=32, width=32)
    batch = draw_batch("train", 3, list(range(6)), config)
    frames = render_frames(batch["layout"], 32, 32)  # (B, F, H, W, 3)
    for i in range(6):
        assert np.array_equal(frames[i].numpy(), S.render(draw_sample("train", 3, i, config)[0]))
    assert batch["references"].shape[2:] == (3, 32, 32) and batch["references"].dtype == torch.uint8
    # sample i is the shards' sample i (same random stream as `bindweave data sprites`)
    shard_config = S.SpritesConfig(num_frames=5, height=32, width=32)
    assert S.make_sample("train", 3, 2, shard_config)[2]["prompt"] == batch["prompt"][2]


# -- the recipe end to end: optimizer, EMA, checkpoint, export -----------------------------------


TINY = [
    "--model.dit.init_args.dim", "32", "--model.dit.init_args.ffn_dim", "64", "--model.dit.init_args.num_heads", "2",
    "--model.dit.init_args.num_layers", "1", "--model.dit.init_args.freq_dim", "32",
    "--model.relational.init_args.reader.init_args.num_layers", "1",  # the readers keep their width: one branch, one width
    "--model.dit.init_args.branches",
    '[{"name": "text", "context_dim": 128, "embedder": "mlp"}, {"name": "image", "context_dim": 128, "embedder": "mlp"}]',
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
    "--trainer.callbacks+=callbacks.LRSchedule", "--trainer.callbacks.warmup_steps=2",
    "--trainer.callbacks+=callbacks.EMA", "--trainer.callbacks.decay=0.5",
    "--trainer.callbacks+=callbacks.RunCheckpoint", "--trainer.callbacks.save_last=true",
    "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.val_batches", "0",
    "--data.init_args.scenes.num_frames", "5", "--data.init_args.scenes.reference_size", "32",
    "--trainer.limit_val_batches", "0", "--trainer.max_steps", "3",
]


def test_reader_recipe_trains_the_reader_and_samples_with_the_ema_weights(tmp_path, monkeypatch):
    from bindweave.cli.app import run_cli
    from bindweave.weights.export import export_checkpoint
    from bindweave.weights.loading import Checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["bindweave"])
    cli = run_cli(["fit", "-c", str(ROOT / "configs/sprites-reader.yaml"), *TINY])
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 3
    reader = dict(module.model.conditioners["relational"].reader.named_parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert reader and all(id(p) in optimised for p in reader.values())  # the optimizer trains the reader
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(group["initial_lr"] * lr_factor(2, 2, 3, min_factor=0.05))

    checkpoint = torch.load("outputs/sprites-reader/checkpoints/last.ckpt", weights_only=True)
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    key = "model.conditioners.relational.reader.patch_embedding.weight"
    assert key in ema and key in raw
    dit_key = "model.dit.patch_embedding.weight"
    for name in (key, dit_key):
        assert not torch.equal(ema[name], raw[name])  # the average is not the raw weights
    # After fit the model holds the EMA weights: what predict and exports sample with.
    own = module.state_dict()
    for name in (key, dit_key):
        torch.testing.assert_close(own[name], ema[name])
    export_checkpoint("outputs/sprites-reader/checkpoints/last.ckpt", "export")
    exported = Checkpoint.open("export", prefix="model")
    torch.testing.assert_close(exported.read(key.removeprefix("model."), torch.float32), ema[key])


def test_a_budget_from_the_command_line_ends_a_real_fit_at_its_step_total(tmp_path, monkeypatch):
    """``budget`` as the command line gives it (a string of seconds) through LightningCLI and
    Lightning's strategy: the fit stops at the total it measured, long before max_steps, and the
    checkpoint keeps that total for a resumed chunk."""
    from bindweave.cli.app import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["bindweave"])
    args = list(TINY[:-2])  # without --trainer.max_steps 3
    at = args.index("--trainer.callbacks.warmup_steps=2") + 1
    args[at:at] = ["--trainer.callbacks.budget=2", "--trainer.callbacks.skip_steps=1", "--trainer.callbacks.measure_steps=2"]
    cli = run_cli(["fit", "-c", str(ROOT / "configs/sprites-reader.yaml"), *args, "--trainer.max_steps", "100000"])
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, LRSchedule))
    assert schedule.budget == 2.0 and schedule.total_steps is not None
    assert cli.trainer.global_step == schedule.total_steps < 100000
    stored = torch.load(tmp_path / "outputs/sprites-reader/checkpoints/last.ckpt", weights_only=False)["callbacks"]["LRSchedule"]
    assert stored["total_steps"] == schedule.total_steps and stored["spent_seconds"] > 0


@pytest.mark.parametrize("variant", ["full", "noref", "t5-only", "t5-mllm", "no-clip", "no-slots"])
def test_reader_recipe_ablations_keep_the_paths_their_names_say(variant, monkeypatch):
    """The recipe's four paths (MLLM role: words + references; T5 role: words; CLIP role: references on
    the image branch; slots) and each ablation's subset, built and run for one loss."""
    import lightning as L

    from bindweave.cli.app import BindWeaveArgumentParser, BindWeaveCLI
    from bindweave.training.module import BindWeave

    monkeypatch.setattr("sys.argv", ["bindweave"])
    configs = ["-c", str(ROOT / "configs/sprites-reader.yaml")]
    if variant != "full":
        configs += ["-c", str(ROOT / f"configs/sprites-reader/{variant}.yaml")]
    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False, save_config_callback=None,
                       parser_class=BindWeaveArgumentParser,
                       args=[*configs, "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                             "--model.dit.init_args.num_layers", "1", "--data.init_args.scenes.num_frames", "5"])
    module = cli.model
    module.configure_model()  # checks every branch and the input channels
    c = module.conditioners
    mllm = "relational" in c and c["relational"].reader.read_references  # words and references in one sequence
    t5 = any(n.startswith("extra_") and not c[n].reader.read_references for n in c)
    clip = "identity" in c and not c["identity"].reader.read_prompt and c["identity"].branch == "image"
    slots = "multi_reference" in c
    paths = {"full": (1, 1, 1, 1), "noref": (0, 1, 0, 0), "t5-only": (0, 1, 1, 1), "t5-mllm": (1, 1, 0, 0),
             "no-clip": (1, 1, 0, 1), "no-slots": (1, 1, 1, 0)}[variant]
    assert (mllm, t5, clip, slots) == tuple(map(bool, paths))
    assert set(module.dit.branches) == ({"text", "image"} if clip else {"text"})
    batch = cli.datamodule.on_after_batch_transfer(next(iter(cli.datamodule.train_dataloader())), 0)
    loss = module.flow_loss(batch)
    loss.backward()
    if clip:  # the CLIP role trains with the DiT
        assert c["identity"].reader.patch_embedding.weight.grad is not None
    if variant != "full":
        assert cli.trainer.default_root_dir.endswith(f"sprites-reader-{variant}")


def test_validation_batches_are_drawn_without_a_worker_spawn_per_validation():
    """An H100 sat idle ~10 s at every validation while one worker process was spawned for one
    batch: one or two batches are drawn in-process, more by workers that stay alive."""
    from bindweave.tasks.sprites.online import SpritesDataModule

    small = OnlineSprites(num_frames=5, height=32, width=32, reference_size=32)
    one = SpritesDataModule(small, batch_size=4, num_workers=6, val_batches=1).val_dataloader()
    assert one.num_workers == 0
    batch = next(iter(one))
    assert batch["prompt"] and len(batch["prompt"]) == 4
    many = SpritesDataModule(small, batch_size=4, num_workers=6, val_batches=3).val_dataloader()
    assert many.num_workers == 3 and many.persistent_workers
