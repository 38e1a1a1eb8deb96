"""Stack the contact sheets that `bindweave predict` wrote for several models, one row per model,
into one labelled PNG per request (docs/results.md shows the shipped sprites model's this way).

    python scripts/sprites_sheets.py --run shipped=outputs/sprites-demo/videos --run noref=outputs/noref/videos \\
        --out docs/sprites-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

LABEL_WIDTH = 72  # pixels left of each row for its name


def stack(sheets: list[tuple[str, Path]]) -> Image.Image:
    """The sheets one under another, each row labelled with its run's name."""
    images = [(name, Image.open(path).convert("RGB")) for name, path in sheets]
    width = LABEL_WIDTH + max(image.width for _, image in images)
    out = Image.new("RGB", (width, sum(image.height for _, image in images)), "white")
    draw, y = ImageDraw.Draw(out), 0
    for name, image in images:
        out.paste(image, (LABEL_WIDTH, y))
        draw.text((6, y + image.height // 2 - 5), name, fill="black")
        y += image.height
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a predict videos folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for <id>.png")
    args = parser.parse_args(argv)
    runs = [(name, Path(folder)) for name, folder in (r.split("=", 1) for r in args.run)]
    ids = sorted(p.stem for p in runs[0][1].glob("*.png"))
    if not ids:
        raise SystemExit(f"error: no contact sheets (<id>.png) in {runs[0][1]}: run `bindweave predict` first.")
    args.out.mkdir(parents=True, exist_ok=True)
    for sample_id in ids:
        stack([(name, folder / f"{sample_id}.png") for name, folder in runs]).save(args.out / f"{sample_id}.png")
    print(f"{len(ids)} sheets -> {args.out}")


if __name__ == "__main__":
    main()
