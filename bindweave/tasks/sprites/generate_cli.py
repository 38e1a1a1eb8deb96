"""``bindweave data sprites``: write a split of procedural sprite samples as shards (docs/sprites.md)."""

from __future__ import annotations

from jsonargparse import ActionYesNo, ArgumentParser

from bindweave.tasks.sprites.scenes import ALL_BACKGROUNDS, SpritesConfig, generate


def sprites_parser():
    """The ``bindweave data sprites`` argument parser."""
    d = SpritesConfig()
    p = ArgumentParser(description="Generate procedural sprite subject-to-video samples as shards (docs/sprites.md).")
    p.add_argument("--out", type=str, required=True, help="output folder (shards, requests.jsonl, references/)")
    p.add_argument("--split", type=str, required=True, help="train, val or test (disjoint appearances)")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, required=True, help="samples")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i is a pure function of (split, seed, i)")
    p.add_argument("--num-frames", "--num_frames", dest="num_frames", type=int, default=d.num_frames, help="frames (1 + 4k)")
    p.add_argument("--height", type=int, default=d.height, help="frame height")
    p.add_argument("--width", type=int, default=d.width, help="frame width")
    p.add_argument("--fps", type=int, default=d.fps, help="frame rate")
    p.add_argument("--sprite-scale", "--sprite_scale", dest="sprite_scale", type=float, default=d.sprite_scale,
                   help="sprite size / shorter frame side")
    p.add_argument("--reference-size", "--reference_size", dest="reference_size", type=int, default=d.reference_size,
                   help="side of the reference images")
    p.add_argument("--max-subjects", "--max_subjects", dest="max_subjects", type=int, default=d.max_subjects,
                   help="most subjects per sample (1..4)")
    p.add_argument("--relation-probability", "--relation_probability", dest="relation_probability", type=float,
                   default=d.relation_probability, help="chance of a depth relation in a sample of 2+ subjects")
    p.add_argument("--backgrounds", nargs="+", choices=sorted(ALL_BACKGROUNDS), default=None,
                   help="backgrounds to draw from (default: the eight of every split; olive and slate are in no default scene)")
    p.add_argument("--samples-per-shard", "--samples_per_shard", dest="samples_per_shard", type=int, default=256,
                   help="samples per shard")
    p.add_argument("--requests", action=ActionYesNo, default=True, help="also write requests.jsonl + references/")
    p.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace an existing shard set")
    p.add_argument("--workers", type=int, default=1, help="processes rendering in parallel (same output for any number)")
    return p


def run_sprites(args) -> dict:
    """Run ``bindweave data sprites`` with parsed arguments; prints and returns the summary."""
    config = SpritesConfig(num_frames=args.num_frames, height=args.height, width=args.width, fps=args.fps,
                           sprite_scale=args.sprite_scale, reference_size=args.reference_size,
                           max_subjects=args.max_subjects, relation_probability=args.relation_probability,
                           backgrounds=tuple(args.backgrounds) if args.backgrounds else None)
    summary = generate(args.out, args.split, args.num_samples, args.seed, config, args.samples_per_shard,
                       requests=args.requests, overwrite=args.overwrite, workers=args.workers)
    print(f"Wrote {summary['samples']} {summary['split']} samples ({summary['appearances']} appearances; motions "
          f"{summary['motions']}) to {len(summary['shards'])} shard(s) in {summary['output']}.")
    return summary
