"""The curriculum: stage boundaries, switching exactly at the step boundary whatever the workers and
gradient accumulation, and the right stage at the right step after resuming a fit mid-stage."""

import warnings

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from bindweave.cli.app import run_cli
from bindweave.data.curriculum import Curriculum, Stage
from bindweave.data.datamodule import DataMonitor
from bindweave.data.resume import StreamLoader
from bindweave.data.samples import SampleDecoder
from bindweave.data.streams import ShardStream
from bindweave.data.resume import StreamStart
from tests.data_helpers import TINY, TINY_SHARDS, make_video, raw_sample, write_tar


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict[str, list[str]]:
    """Sets "a" and "b" of 2 shards x 4 samples each (keys a0-0 ... b1-3)."""
    folder = tmp_path_factory.mktemp("curriculum")
    video = make_video(folder / "v.mp4").read_bytes()
    sets = {}
    for name in "ab":
        sets[name] = [str(write_tar(folder / f"{name}-{s:06d}.tar", [raw_sample(f"{name}{s}-{i}", video) for i in range(4)]))
                      for s in range(2)]
    return sets


def test_stage_boundaries_and_checks():
    curriculum = Curriculum([Stage(urls=["a"], steps=1000, name="curated"), Stage(urls=["a", "b"], weights=[1, 4])])
    assert [curriculum.stage_at(s) for s in (0, 999, 1000, 10**6)] == [0, 0, 1, 1]
    assert curriculum.total_steps is None and curriculum.stages[1].name == "stage1"
    assert "curated: steps [0, 1000)" in curriculum.describe()
    assert Curriculum([Stage(urls="a", steps=3), Stage(urls="b", steps=2)]).total_steps == 5
    with pytest.raises(ValueError, match="only the last stage"):
        Curriculum([Stage(urls=["a"]), Stage(urls=["b"], steps=5)])
    with pytest.raises(ValueError, match="one weight per entry"):
        Curriculum([Stage(urls=["a", "b"], weights=[1.0])])
    with pytest.raises(ValueError, match="positive"):
        Curriculum([Stage(urls=["a"], steps=0)])


@pytest.mark.parametrize("start_step", [0, 2])
def test_batches_switch_stage_exactly_at_the_step_boundary(two_sets, start_step):
    curriculum = Curriculum([Stage(urls=["a"], steps=3), Stage(urls=["b"])])
    decoder = SampleDecoder(num_frames=5, fps=8, buckets=[(32, 48)])
    stream = ShardStream([[two_sets["a"]], [two_sets["b"]]], [None, None], curriculum, decoder, batch_size=1,
                         batches=10, accumulate=2, shuffle_buffer=4)
    # As after a resume at this step: 2 batches per step trained; the epoch's other batches follow.
    start = lambda: StreamStart(batches=2 * start_step, step=start_step)  # noqa: E731
    batches = list(StreamLoader(stream, start, num_workers=2))
    assert len(batches) == 10 - 2 * start_step
    for i, batch in enumerate(batches):
        step = start_step + i // 2  # two batches per optimizer step
        expected = "a" if step < 3 else "b"
        assert batch["stage"] == (step >= 3) and batch["id"][0][0] == expected, (i, step, batch["id"])


class StageRecorder(Callback):
    """Records (global step, stage, sample ids) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[str]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, batch["stage"], list(batch["id"])))


def test_fit_checkpoint_and_resume_mid_stage_through_the_cli(two_sets, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # tiny.yaml writes under ./outputs/tiny
    curriculum = tmp_path / "curriculum.yaml"
    curriculum.write_text(yaml.safe_dump({"data": {"init_args": {
        "urls": None, "batch_size": 1, "samples_per_epoch": 2,  # 2-step epochs: the loader restarts
        "curriculum": [{"name": "curated", "urls": [two_sets["a"][0], two_sets["a"][1]], "steps": 3},
                       {"name": "full", "urls": two_sets["b"]}],
    }}}))
    common = ["-c", TINY, "-c", TINY_SHARDS, "-c", str(curriculum), "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=tests.test_data_curriculum.StageRecorder"]

    def recorded(cli):  # the CLI imports this module as tests.test_data_curriculum: compare names
        return next(c for c in cli.trainer.callbacks if type(c).__name__ == "StageRecorder").seen

    first = run_cli(["fit", *common, "--trainer.max_steps", "2"])
    assert [(step, stage) for step, stage, _ in recorded(first)] == [(0, 0), (1, 0)]
    assert any(isinstance(c, DataMonitor) for c in first.trainer.callbacks)
    assert first.trainer.callback_metrics["data/stage"] == 0

    checkpoint = tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO"):
        second = run_cli(["fit", *common, "--trainer.max_steps", "5", "--ckpt_path", str(checkpoint)])
    seen = recorded(second)
    assert [(step, stage) for step, stage, _ in seen] == [(2, 0), (3, 1), (4, 1)]  # stage "curated" ends after step 2
    assert all(ids[0][0] == ("a" if step < 3 else "b") for step, _, ids in seen)
    assert second.trainer.callback_metrics["data/stage"] == 1
    assert "Data: step 3 draws from curriculum stage 1 (full)" in caplog.text


def test_a_datamodule_warns_but_adds_no_monitor_behind_the_users_back():
    """Without ``callbacks.DataMonitor`` the trainer is warned once that skipped samples go unlogged,
    and its callbacks are left as they were; with one, nothing is said."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(callbacks=[])
    with pytest.warns(UserWarning, match="add `- class_path: callbacks.DataMonitor`"):
        DataMonitor.check_present(trainer)
    assert trainer.callbacks == []
    monitored = SimpleNamespace(callbacks=[DataMonitor()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataMonitor.check_present(monitored)
