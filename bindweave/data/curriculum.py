"""The training-data curriculum: stages of shard sets, each for a number of optimizer steps.

BindWeave trains on a curated high-quality subset first (~1,000 steps), then on everything
(~5,000). A stage is a function of the global step only, so it survives checkpoint and resume:
the loader asks which stage step ``s`` is in and draws that batch from the stage's shards (see
``bindweave.data.datamodule.ShardStream``), switching exactly at the step boundary.

```yaml
data:
  class_path: bindweave.data.datamodule.WebDataModule
  init_args:
    curriculum:
      - {name: curated, urls: ["data/curated/shard-{000000..000031}.tar"], steps: 1000}
      - {name: full, urls: ["data/curated/shard-{000000..000031}.tar", "data/all/shard-{000000..000999}.tar"],
         weights: [0.1, 0.9]}
```
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class Stage:
    """One stage of the curriculum.

    Args:
        urls: the stage's shard sets, one pattern (brace range or glob) or list entry per set.
        steps: optimizer steps spent in this stage; None only for the last stage (it runs until
            ``trainer.max_steps``).
        weights: sampling weight of each entry of ``urls`` (mixed sample by sample); None pools all
            shards, so a set weighs by its number of shards.
        name: name shown in logs (default ``stage<i>``).
    """

    urls: list[str]
    steps: int | None = None
    weights: list[float] | None = None
    name: str | None = None


class Curriculum:
    """Stages in order; ``stage_at(step)`` is the stage of global optimizer step ``step``."""

    def __init__(self, stages: list[Stage]) -> None:
        if not stages:
            raise ValueError("A curriculum needs at least one stage.")
        for i, stage in enumerate(stages):
            name = stage.name or f"stage{i}"
            if isinstance(stage.urls, str):
                stage.urls = [stage.urls]
            if not stage.urls:
                raise ValueError(f"Curriculum stage {name!r} has no urls.")
            if stage.steps is None and i != len(stages) - 1:
                raise ValueError(f"Curriculum stage {name!r} has no `steps`; only the last stage may run open-ended.")
            if stage.steps is not None and stage.steps < 1:
                raise ValueError(f"Curriculum stage {name!r} has steps={stage.steps}; give a positive number.")
            if stage.weights is not None:
                if len(stage.weights) != len(stage.urls):
                    raise ValueError(
                        f"Curriculum stage {name!r} has {len(stage.weights)} weights for {len(stage.urls)} urls entries; "
                        f"give one weight per entry."
                    )
                if any(w < 0 for w in stage.weights) or not sum(stage.weights) > 0:
                    raise ValueError(f"Curriculum stage {name!r} weights must be >= 0 with a positive sum, got {stage.weights}.")
            stage.name = name
        self.stages = stages
        self.starts = [0]
        for stage in stages[:-1]:
            self.starts.append(self.starts[-1] + stage.steps)

    def __len__(self) -> int:
        return len(self.stages)

    def stage_at(self, step: int) -> int:
        """Index of the stage that global step ``step`` (0-based) belongs to; the last stage goes on
        past its ``steps``."""
        return bisect.bisect_right(self.starts, step) - 1

    @property
    def total_steps(self) -> int | None:
        """Steps of all stages together (None when the last stage is open-ended)."""
        last = self.stages[-1].steps
        return None if last is None else self.starts[-1] + last

    def describe(self) -> str:
        """One line per stage: name, step range, shard sets and weights."""
        lines = []
        for stage, start in zip(self.stages, self.starts):
            end = "" if stage.steps is None else str(start + stage.steps)
            weights = f" weights {stage.weights}" if stage.weights else ""
            lines.append(f"{stage.name}: steps [{start}, {end}) from {stage.urls}{weights}")
        return "\n".join(lines)
