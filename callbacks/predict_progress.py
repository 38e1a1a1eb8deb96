"""The console of ``bindweave predict``: progress per denoising step, without library noise."""

from __future__ import annotations

import contextlib
import warnings

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bindweave.inference.sampler import listen_to_steps

QUIET = (
    # References load in milliseconds next to minutes of sampling: more workers change nothing.
    (r"The 'predict_dataloader' does not have many workers", PossibleUserWarning),
    # bindweave.inference.requests.SizeBatchSampler yields every request: Lightning's drop_last caveat does not apply.
    (r"You are using a custom batch sampler `SizeBatchSampler` for prediction", PossibleUserWarning),
    # torch deprecates a pytree class that Lightning's data loading still uses.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
"""(message regex, category) of the warnings hidden during ``predict``: Lightning's and torch's, none
that a predict user can act on."""


class PredictProgress(Callback):
    """Shows ``predict``'s progress per denoising step and hides library warnings it cannot act on.

    Lightning's progress bar ticks once per batch, so it sits at 0/1 for the whole sampling of a
    video. During ``predict`` this callback sets the trainer's progress bar aside (its public
    ``disable()``, and ``enable()`` after) and shows two bars on stderr instead (rank zero only)::

        Predict (3 already done):  40%|████      | 2/5 [01:10<01:45, 35.0s/request, failed=1]
        red-blue:  60%|██████    | 30/50 [00:21<00:14, 1.4step/s]

    The first counts requests (generated or failed), the second the denoising steps of the
    video(s) being sampled, heard through :func:`bindweave.inference.sampler.listen_to_steps`; log lines
    (the ``VideoWriter``'s failed requests) are written above the bars. With
    ``trainer.enable_progress_bar: false`` neither is shown.

    From ``setup`` to ``teardown`` of ``predict`` (never at import, never in ``fit``), the warnings
    of :data:`QUIET` are hidden, each matched by its message and category; every other warning
    still shows.
    """

    def __init__(self) -> None:
        super().__init__()
        self._scope: contextlib.ExitStack | None = None
        self._set_aside = None
        self._requests: tqdm | None = None
        self._steps: tqdm | None = None
        self._failed = 0

    # Scope: setup -> teardown (or on_exception) of predict.

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self._close()
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(warnings.catch_warnings())
        for message, category in QUIET:
            warnings.filterwarnings("ignore", message=message, category=category)
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled and trainer.is_global_zero:
            bar.disable()
            self._set_aside = bar
            self._scope.enter_context(listen_to_steps(self._on_step))
            self._scope.enter_context(logging_redirect_tqdm())  # log lines (a failed request) above the bars

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":
            self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        self._close_bars()
        if self._scope is not None:
            self._scope.close()
            self._scope = None
        if self._set_aside is not None:
            self._set_aside.enable()
            self._set_aside = None

    # Bars.

    def on_predict_start(self, trainer, pl_module) -> None:
        if self._set_aside is None:
            return
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:
            total = sum(len(loader.dataset) for loader in loaders)
        except (AttributeError, TypeError):  # an iterable without a sized dataset
            total = None
        skipped = len(getattr(trainer.datamodule, "skipped", None) or [])
        self._failed = 0
        if total == 0:
            return  # nothing to generate: the VideoWriter's summary says so
        description = f"Predict ({skipped} already done)" if skipped else "Predict"
        self._requests = tqdm(total=total, desc=description, unit="request", position=0, dynamic_ncols=True)

    def _on_step(self, done: int, total: int, ids: list[str]) -> None:
        if self._requests is None:
            return
        if done == 0:  # a new video (or a retry of one request of a failed batch)
            shown = ", ".join(ids[:2]) + (f" +{len(ids) - 2}" if len(ids) > 2 else "") or "sampling"
            if self._steps is None:
                self._steps = tqdm(total=total, desc=shown, unit="step", position=1, leave=False, dynamic_ncols=True)
            else:
                self._steps.set_description(shown, refresh=False)
                self._steps.reset(total=total)
        elif self._steps is not None:
            self._steps.update(done - self._steps.n)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._requests is None:
            return
        if isinstance(outputs, dict) and "id" in outputs:
            failed = len(outputs.get("failed", []))
            advance = len(outputs["id"]) + failed
        else:
            failed, advance = 0, len(batch["prompt"]) if isinstance(batch, dict) and "prompt" in batch else 1
        self._failed += failed
        if self._failed:
            self._requests.set_postfix(failed=self._failed, refresh=False)
        self._requests.update(advance)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._close_bars()  # before the VideoWriter prints its summary in on_predict_end

    def _close_bars(self) -> None:
        for bar in (self._steps, self._requests):
            if bar is not None:
                bar.close()
        self._steps = self._requests = None
