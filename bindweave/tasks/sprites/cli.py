"""``bindweave eval``: ground-truth metrics of generated videos on the sprites test split.

```bash
bindweave eval --data 'data/sprites/test/shard-*.tar' --run full=outputs/sprites/videos \
    --run noref=outputs/sprites-noref/videos --ground_truth --out outputs/sprites-eval.json
```

Each ``--run name=folder`` holds ``<id>.mp4`` videos named by sample id (what ``bindweave predict``
writes for ``<split>/requests.jsonl``). Prints one Markdown table row per run and writes every
per-sample and per-subject number as JSON. ``--baseline noref`` adds each run's paired difference
from that run (mean ± standard error over the scenes both scored); ``--reference_points`` adds rows
for the ground truth with one thing wrong, which say what each level of a metric means;
``--by_subjects`` splits subject MSE and identity by the number of subjects in the scene. See
bindweave/tasks/sprites/evaluate.py for the metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser

from bindweave.tasks.sprites.evaluate import (evaluate_reference_points, evaluate_run, format_by_subjects, format_comparison,
                                format_table, read_ground_truth, to_json)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="bindweave eval", description="Score generated videos against the sprites ground truth.")
    p.add_argument("--data", type=str, nargs="+", required=True, help="sprites shards (brace ranges, globs)")
    p.add_argument("--run", type=str, action="append", default=[], help="name=folder of <id>.mp4 videos (repeatable)")
    p.add_argument("--ground_truth", "--ground-truth", action=ActionYesNo, default=False,
                   help="add a row for the ground truth itself (the perfect score)")
    p.add_argument("--reference_points", "--reference-points", action=ActionYesNo, default=False,
                   help="add rows for the ground truth with one thing wrong (no subjects, other subjects, other "
                        "shapes, another start row, no motion): what each level of a metric means")
    p.add_argument("--limit", type=int | None, default=None, help="score only the first N samples")
    p.add_argument("--workers", type=int, default=1, help="processes scoring in parallel (same numbers)")
    p.add_argument("--baseline", type=str | None, default=None,
                   help="a run's name: add a table of every other run's paired difference from it (mean ± s.e.)")
    p.add_argument("--by_subjects", "--by-subjects", action=ActionYesNo, default=False,
                   help="add a table of subject MSE and identity per number of subjects in the scene")
    p.add_argument("--out", type=str | None, default=None, help="JSON file of all results")
    p.add_argument("--table", type=str | None, default=None, help="Markdown file of the table")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs_args = {}
        for spec in args.run:
            name, sep, folder = spec.partition("=")
            if not sep:
                name, folder = Path(spec).name, spec
            if not Path(folder).is_dir():
                raise ValueError(f"--run {spec}: {folder} is not a folder of <id>.mp4 videos.")
            runs_args[name] = folder
        if args.baseline is not None and args.baseline not in runs_args:
            raise ValueError(f"--baseline {args.baseline}: no --run of that name (runs: {', '.join(runs_args) or 'none'}).")
        if not runs_args and not args.ground_truth and not args.reference_points:
            raise ValueError("Nothing to score: give --run name=folder (and/or --ground_truth, --reference_points).")
        truth = read_ground_truth(args.data)
        runs = {}
        if args.ground_truth:
            runs["ground truth"] = evaluate_run(None, truth, args.limit, args.workers)
        if args.reference_points:
            runs.update(evaluate_reference_points(truth, args.limit, args.workers))
        for name, folder in runs_args.items():
            runs[name] = evaluate_run(folder, truth, args.limit, args.workers)
    except ValueError as error:
        print(f"bindweave eval: error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    table = format_table(runs)
    if args.baseline is not None:
        table += "\n\n" + format_comparison(runs, args.baseline)
    if args.by_subjects:
        table += "\n\n" + format_by_subjects(runs)
    print(table)
    for name, result in runs.items():
        if result["missing"]:
            print(f"{name}: {len(result['missing'])} video(s) missing, e.g. {result['missing'][:3]}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(to_json(runs))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table + "\n")
    return runs


if __name__ == "__main__":
    main()
