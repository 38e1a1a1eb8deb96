"""Procedural subject-to-video samples: textured sprites that move as the prompt says (issue #8).

A sample is 1–4 *subjects*, each a sprite of one appearance (shape × pattern × two colours: 8 × 8
× 12 × 11 = 8,448 appearances), on a background whose colour the prompt names. The prompt gives
every subject's start cell on a 3 × 3 grid, its motion (``moves to the right|left``, ``moves
up|down``, ``jumps``, ``stays still``) and at most one depth relation (``passing behind|in front of
the second subject``). Nothing else is free: the frames are a pure function of the prompt and the
subjects' appearances, which only the reference images show (the prompt calls the subjects "the
first subject", "the second subject", ...). :func:`scene_from_prompt` parses a prompt back into the
scene and the tests re-render every sample from it.

Layering: a subject with a relation is drawn behind / in front of the subject it names; otherwise
an earlier subject is in front of a later one.

Splits: the split of an appearance is a hash of its parameters (80 % train, 10 % val, 10 % test),
so the three splits share no appearance and the model must take identity from the references.
Each reference is its subject alone on white, at a random scale (``reference_scale``) and offset
inside the image, so copying the reference's pixels is not enough.

The JSON record of a sample holds its ground truth under ``sprites``: the scene (background,
appearances, start cells, motions, depths), each subject's box per frame and each reference's
placement; :func:`render_record` re-renders the video from it and :mod:`bindweave.tasks.sprites.evaluate` scores
generated videos against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import av
import numpy as np
from PIL import Image

from bindweave.atomic import write_atomic
from bindweave.model.batch import check_num_frames
from bindweave.data.shards import ShardWriter
from bindweave.data.video_io import read_video

VERSION = 1
"""Version of the rendering rules; stored in every record (a change of the rules bumps it)."""

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring")
PATTERNS = ("hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "halves", "spot")
COLOURS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 220, 30), "lime": (150, 230, 40),
    "green": (20, 150, 50), "cyan": (30, 210, 220), "blue": (30, 80, 230), "purple": (140, 50, 200),
    "magenta": (230, 40, 200), "pink": (250, 160, 190), "white": (250, 250, 250), "black": (15, 15, 15),
}
"""Sprite colours."""
BACKGROUNDS = {
    "grey": (128, 128, 128), "dark blue": (25, 35, 80), "dark green": (25, 70, 40), "brown": (100, 65, 40),
    "beige": (215, 200, 160), "teal": (40, 110, 110), "maroon": (95, 20, 35), "lavender": (185, 170, 215),
}
"""Background colours, none of them a sprite colour: a scene draws one of these."""
EXTRA_BACKGROUNDS = {"olive": (110, 110, 30), "slate": (70, 80, 95)}
"""Backgrounds no default scene has: a new skill to teach a trained model (``--backgrounds olive``)."""
ALL_BACKGROUNDS = {**BACKGROUNDS, **EXTRA_BACKGROUNDS}
"""Every background a prompt may name (rendering, parsing and scoring look them up here)."""

ROWS = {"top": 0.2, "middle": 0.5, "bottom": 0.8}
COLUMNS = {"left": 0.2, "centre": 0.5, "right": 0.8}
ORDINALS = ("first", "second", "third", "fourth")
MOTIONS = ("right", "left", "up", "down", "jumps", "still")
TRAVEL = 0.6
"""How far a moving subject travels over the clip, as a fraction of the frame."""
JUMP = 0.3
"""Height of a jump, as a fraction of the frame height."""
SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
"""Split of an appearance: its hash modulo 100 falls in [low, high)."""
WHITE = (255, 255, 255)


# -- appearances ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Appearance:
    """What a sprite looks like: a shape filled with a two-colour pattern."""

    shape: str
    pattern: str
    colour: str
    colour2: str

    def key(self) -> str:
        return f"{self.shape}|{self.pattern}|{self.colour}|{self.colour2}"

    def split(self) -> str:
        """The split this appearance belongs to (train, val or test), from a hash of its parameters."""
        bucket = int.from_bytes(hashlib.sha256(self.key().encode()).digest()[:8], "big") % 100
        return next(name for name, (low, high) in SPLITS.items() if low <= bucket < high)


def all_appearances() -> list[Appearance]:
    """Every appearance (8,448)."""
    return [Appearance(s, p, c, c2) for s in SHAPES for p in PATTERNS for c in COLOURS for c2 in COLOURS if c2 != c]


def random_appearance(rng: random.Random, split: str) -> Appearance:
    """A uniformly random appearance of ``split`` (rejection sampling)."""
    while True:
        colour, colour2 = rng.sample(sorted(COLOURS), 2)
        appearance = Appearance(rng.choice(SHAPES), rng.choice(PATTERNS), colour, colour2)
        if appearance.split() == split:
            return appearance


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of ``shape`` over centred coordinates u (x), v (y) in [-1, 1]."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 0.95
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "triangle":
        return (v <= 0.8) & (v >= -0.9 + 1.7 * abs(u) / 0.95)
    if shape == "diamond":
        return abs(u) + abs(v) <= 0.98
    if shape == "star":
        angle = np.arctan2(v, u)
        return r <= 0.55 + 0.4 * np.cos(5 * angle + np.pi / 2) ** 2
    if shape == "hexagon":
        return (abs(v) <= 0.82) & (abs(u) * 0.866 + abs(v) * 0.5 <= 0.82)
    if shape == "cross":
        return ((abs(u) <= 0.35) | (abs(v) <= 0.35)) & (np.maximum(abs(u), abs(v)) <= 0.95)
    if shape == "ring":
        return (r <= 0.95) & (r >= 0.45)
    raise ValueError(f"Unknown shape {shape!r}; one of {SHAPES}.")


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the second colour goes, over centred coordinates u, v in [-1, 1]."""
    cells = lambda w: np.floor((w + 1) * 2.5).astype(int)  # noqa: E731  five bands across the sprite
    if pattern == "hstripes":
        return cells(v) % 2 == 1
    if pattern == "vstripes":
        return cells(u) % 2 == 1
    if pattern == "diagonal":
        return np.floor((u + v + 2) * 2).astype(int) % 2 == 1
    if pattern == "checker":
        return (np.floor((u + 1) * 2) + np.floor((v + 1) * 2)).astype(int) % 2 == 1
    if pattern == "dots":
        return np.hypot((u + 1) % 0.5 - 0.25, (v + 1) % 0.5 - 0.25) <= 0.14
    if pattern == "rings":
        return np.floor(np.hypot(u, v) * 4).astype(int) % 2 == 1
    if pattern == "halves":
        return u > 0
    if pattern == "spot":
        return np.hypot(u, v) <= 0.45
    raise ValueError(f"Unknown pattern {pattern!r}; one of {PATTERNS}.")


def render_sprite(appearance: Appearance, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The sprite at ``size`` × ``size`` pixels: RGB (size, size, 3) uint8 and its mask (size, size) bool."""
    centres = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(centres, centres)  # (size, size) each: x and y
    mask = _shape_mask(appearance.shape, u, v)
    second = _pattern(appearance.pattern, u, v)
    rgb = np.where(second[..., None], np.array(COLOURS[appearance.colour2], np.uint8), np.array(COLOURS[appearance.colour], np.uint8))
    return rgb.astype(np.uint8), mask


# -- scenes -----------------------------------------------------------------------------------


@dataclass
class Subject:
    """One subject of a scene: its appearance, start cell (row, column names), motion and depth
    (higher is in front)."""

    appearance: Appearance
    row: str
    column: str
    motion: str
    depth: float
    relation: tuple[str, int] | None = None
    """("behind" | "in front of", index of the other subject), or None."""


@dataclass
class Scene:
    """Everything that decides a video."""

    background: str
    subjects: list[Subject]
    num_frames: int
    height: int
    width: int
    sprite_scale: float

    @property
    def sprite_size(self) -> int:
        return max(4, round(self.sprite_scale * min(self.height, self.width)))


def cell_name(row: str, column: str) -> str:
    """``top left``, ``top``, ..., ``centre``, ..., ``bottom right``."""
    if row == "middle":
        return column
    return row if column == "centre" else f"{row} {column}"


CELLS = {cell_name(r, c): (r, c) for r in ROWS for c in COLUMNS}


def centre_at(subject: Subject, t: float) -> tuple[float, float]:
    """Centre (x, y) of a subject, as fractions of the frame, at time t in [0, 1]."""
    x, y = COLUMNS[subject.column], ROWS[subject.row]
    if subject.motion == "right":
        x += TRAVEL * t
    elif subject.motion == "left":
        x -= TRAVEL * t
    elif subject.motion == "up":
        y -= TRAVEL * t
    elif subject.motion == "down":
        y += TRAVEL * t
    elif subject.motion == "jumps":
        y -= JUMP * math.sin(math.pi * t)
    return x, y


def boxes(scene: Scene) -> list[list[list[int]]]:
    """Per subject, per frame, its box [x0, y0, x1, y1) in pixels (may reach outside the frame)."""
    size, out = scene.sprite_size, []
    for subject in scene.subjects:
        track = []
        for f in range(scene.num_frames):
            x, y = centre_at(subject, f / max(1, scene.num_frames - 1))
            x0, y0 = round(x * scene.width - size / 2), round(y * scene.height - size / 2)
            track.append([x0, y0, x0 + size, y0 + size])
        out.append(track)
    return out


def _paste(canvas: np.ndarray, rgb: np.ndarray, mask: np.ndarray, x0: int, y0: int, owner: np.ndarray | None = None,
           label: int = 0) -> None:
    """Paste a sprite with its top-left corner at (x0, y0), clipped to the canvas."""
    h, w = canvas.shape[:2]
    s = rgb.shape[0]
    ya, yb, xa, xb = max(0, y0), min(h, y0 + s), max(0, x0), min(w, x0 + s)
    if ya >= yb or xa >= xb:
        return
    m = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
    canvas[ya:yb, xa:xb][m] = rgb[ya - y0 : yb - y0, xa - x0 : xb - x0][m]
    if owner is not None:
        owner[ya:yb, xa:xb][m] = label


def render(scene: Scene, with_owner: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The video (F, H, W, 3) uint8; with ``with_owner`` also (F, H, W) int8: which subject each
    pixel shows (-1: background)."""
    sprites = [render_sprite(s.appearance, scene.sprite_size) for s in scene.subjects]
    order = sorted(range(len(scene.subjects)), key=lambda i: scene.subjects[i].depth)  # back to front
    tracks = boxes(scene)
    video = np.empty((scene.num_frames, scene.height, scene.width, 3), np.uint8)
    owner = np.full((scene.num_frames, scene.height, scene.width), -1, np.int8)
    video[:] = np.array(ALL_BACKGROUNDS[scene.background], np.uint8)
    for f in range(scene.num_frames):
        for i in order:
            x0, y0 = tracks[i][f][:2]
            _paste(video[f], *sprites[i], x0, y0, owner[f], i)
    return (video, owner) if with_owner else video


# -- prompts ----------------------------------------------------------------------------------


def _clause(scene: Scene, index: int) -> str:
    s = scene.subjects[index]
    name = f"the {ORDINALS[index]} subject"
    cell = cell_name(s.row, s.column)
    if s.motion == "still":
        text = f"{name} stays still at the {cell}"
    elif s.motion == "jumps":
        text = f"{name} starts at the {cell} and jumps"
    else:
        text = f"{name} starts at the {cell} and moves {'to the ' if s.motion in ('left', 'right') else ''}{s.motion}"
    if s.relation is not None:
        text += f", passing {s.relation[0]} the {ORDINALS[s.relation[1]]} subject"
    return text


def prompt_of(scene: Scene) -> str:
    """The prompt that decides the scene (with the subjects' appearances)."""
    clauses = [_clause(scene, i) for i in range(len(scene.subjects))]
    body = clauses[0]
    if len(clauses) > 1:
        body += " while " + ", and ".join(clauses[1:])
    article = "an" if scene.background[0] in "aeiou" else "a"  # "an olive" (no default background starts with a vowel)
    return f"On {article} {scene.background} background, {body}."


def scene_from_prompt(prompt: str, appearances: list[Appearance], num_frames: int, height: int, width: int,
                      sprite_scale: float) -> Scene:
    """Parse a prompt of :func:`prompt_of` back into its scene (the inverse, given the appearances
    the references show); a prompt it does not describe is a ``ValueError``."""
    import re

    match = re.fullmatch(r"On an? (.+?) background, (.+)\.", prompt)
    if not match or match.group(1) not in ALL_BACKGROUNDS:
        raise ValueError(f"Not a sprites prompt: {prompt!r}")
    parts = re.split(r"(?:^| while |, and )(?=the (?:first|second|third|fourth) subject )", match.group(2))
    parts = [p for p in parts if p]
    if len(parts) != len(appearances):
        raise ValueError(f"The prompt describes {len(parts)} subjects, {len(appearances)} appearances given: {prompt!r}")
    cells = "|".join(sorted(CELLS, key=len, reverse=True))
    subjects = []
    for index, (part, appearance) in enumerate(zip(parts, appearances)):
        m = re.fullmatch(
            rf"the (\w+) subject (?:stays still at the (?P<still>{cells})|starts at the (?P<cell>{cells}) and "
            rf"(?:(?P<jump>jumps)|moves (?:to the )?(?P<dir>right|left|up|down)))"
            rf"(?:, passing (?P<rel>behind|in front of) the (?P<other>\w+) subject)?", part)
        if not m or m.group(1) != ORDINALS[index]:
            raise ValueError(f"Cannot parse {part!r} as the clause of the {ORDINALS[index]} subject.")
        row, column = CELLS[m.group("still") or m.group("cell")]
        motion = "still" if m.group("still") else "jumps" if m.group("jump") else m.group("dir")
        relation = (m.group("rel"), ORDINALS.index(m.group("other"))) if m.group("rel") else None
        subjects.append(Subject(appearance, row, column, motion, depth=-float(index), relation=relation))
    _apply_relations(subjects)
    return Scene(match.group(1), subjects, num_frames, height, width, sprite_scale)


def _apply_relations(subjects: list[Subject]) -> None:
    """Depths: earlier subjects in front; a relation puts its subject just behind / in front of the other."""
    for i, s in enumerate(subjects):
        s.depth = -float(i)
    for s in subjects:
        if s.relation is not None:
            other = subjects[s.relation[1]].depth
            s.depth = other - 0.5 if s.relation[0] == "behind" else other + 0.5


# -- sampling scenes --------------------------------------------------------------------------


def _start_cells(motion: str) -> list[tuple[str, str]]:
    """Start cells from which ``motion`` stays inside the frame."""
    rows, columns = list(ROWS), list(COLUMNS)
    if motion == "right":
        columns = ["left"]
    elif motion == "left":
        columns = ["right"]
    elif motion == "down":
        rows = ["top"]
    elif motion == "up":
        rows = ["bottom"]
    elif motion == "jumps":
        rows = ["middle", "bottom"]
    return [(r, c) for r in rows for c in columns]


def path_cells(row: str, column: str, motion: str) -> tuple[set, set]:
    """(cells a subject passes through, cells it stays in for a while: start, end, jump top)."""
    rows, columns = list(ROWS), list(COLUMNS)
    start = (row, column)
    if motion in ("right", "left"):
        end = (row, columns[2 if motion == "right" else 0])
        return {(row, c) for c in columns}, {start, end}
    if motion in ("up", "down"):
        end = (rows[0 if motion == "up" else 2], column)
        return {(r, column) for r in rows}, {start, end}
    if motion == "jumps":
        top = (rows[rows.index(row) - 1], column)
        return {start, top}, {start, top}
    return {start}, {start}


def random_scene(rng: random.Random, split: str, num_frames: int, height: int, width: int, sprite_scale: float,
                 max_subjects: int = 4, relation_probability: float = 0.3, backgrounds: tuple[str, ...] | None = None) -> Scene:
    """A random scene of 1..max_subjects subjects of distinct appearances of ``split``, on one of
    ``backgrounds`` (names of :data:`ALL_BACKGROUNDS`; None: :data:`BACKGROUNDS`).

    No subject stays (starts, ends, jumps) where another one passes, so subjects only meet in
    passing, and in the one planned crossing of a depth relation (a subject crossing a still one)."""
    count = rng.randint(1, max_subjects)
    appearances: list[Appearance] = []
    while len(appearances) < count:
        a = random_appearance(rng, split)
        if a not in appearances:
            appearances.append(a)
    plan: dict[int, tuple] = {}
    if count >= 2 and rng.random() < relation_probability:  # subject a crosses subject b, still in the middle of a row
        a, b = rng.sample(range(count), 2)
        row, motion = rng.choice(list(ROWS)), rng.choice(["right", "left"])
        plan = {b: (row, "centre", "still", None),
                a: (row, "left" if motion == "right" else "right", motion, (rng.choice(["behind", "in front of"]), b))}
    placed: list[tuple[set, set]] = [path_cells(*p[:3]) for p in plan.values()]
    kept: dict[int, Subject] = {}
    for i in range(count):
        if i in plan:
            row, column, motion, relation = plan[i]
        else:
            relation = None
            for _ in range(100):
                motion = rng.choice(MOTIONS)
                row, column = rng.choice(_start_cells(motion))
                path, dwell = path_cells(row, column, motion)
                if all(not (dwell & other_path) and not (path & other_dwell) for other_path, other_dwell in placed):
                    break
            else:
                continue  # no room left on the grid: one subject fewer
            placed.append((path, dwell))
        kept[i] = Subject(appearances[i], row, column, motion, 0.0, relation)
    index = {old: new for new, old in enumerate(kept)}
    subjects = list(kept.values())
    for s in subjects:
        if s.relation is not None:
            s.relation = (s.relation[0], index[s.relation[1]])
    _apply_relations(subjects)
    return Scene(rng.choice(sorted(backgrounds or BACKGROUNDS)), subjects, num_frames, height, width, sprite_scale)


# -- references, records, encoding ------------------------------------------------------------


def render_reference(appearance: Appearance, size: int, scale: float, offset: tuple[float, float]) -> tuple[np.ndarray, list[int]]:
    """The subject alone on white: a (size, size, 3) uint8 image, the sprite ``scale`` × size wide,
    its centre moved by ``offset`` (fractions of the free room either way); and its box."""
    sprite_size = max(4, round(scale * size))
    rgb, mask = render_sprite(appearance, sprite_size)
    image = np.full((size, size, 3), 255, np.uint8)
    room = size - sprite_size
    x0 = round(room / 2 * (1 + offset[0]))
    y0 = round(room / 2 * (1 + offset[1]))
    _paste(image, rgb, mask, x0, y0)
    return image, [x0, y0, x0 + sprite_size, y0 + sprite_size]


def encode_video(frames: np.ndarray, fps: int) -> bytes:
    """Lossless mp4 (H.264 RGB, qp 0) of (F, H, W, 3) uint8 frames: decoding gives the same pixels."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_video(data: bytes | str | Path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file or its bytes."""
    return read_video(data).numpy()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_to_json(scene: Scene) -> dict:
    return {
        "version": VERSION, "background": scene.background, "background_rgb": list(ALL_BACKGROUNDS[scene.background]),
        "num_frames": scene.num_frames, "height": scene.height, "width": scene.width,
        "sprite_scale": scene.sprite_scale, "sprite_size": scene.sprite_size,
        "subjects": [
            {"appearance": asdict(s.appearance), "row": s.row, "column": s.column, "motion": s.motion,
             "depth": s.depth, "relation": list(s.relation) if s.relation else None}
            for s in scene.subjects
        ],
    }


def scene_from_json(data: dict) -> Scene:
    """The scene of a record's ``sprites`` entry (or of the whole record)."""
    data = data.get("sprites", data)
    if data.get("version") != VERSION:
        raise ValueError(f"sprites record version {data.get('version')!r}; this code renders version {VERSION}.")
    subjects = [Subject(Appearance(**s["appearance"]), s["row"], s["column"], s["motion"], float(s["depth"]),
                        tuple(s["relation"]) if s["relation"] else None) for s in data["subjects"]]
    return Scene(data["background"], subjects, data["num_frames"], data["height"], data["width"], data["sprite_scale"])


def render_record(record: dict) -> np.ndarray:
    """Re-render a sample's video (F, H, W, 3) uint8 from its JSON record."""
    return render(scene_from_json(record))


@dataclass
class SpritesConfig:
    """Settings of a generated split (all stored in each record).

    Args:
        num_frames: frames per video (1 + 4k).
        height: frame height in pixels.
        width: frame width in pixels.
        fps: frame rate of the videos.
        sprite_scale: sprite size as a fraction of the frame's shorter side.
        reference_size: side of the square reference images.
        reference_scale: range of the sprite's size in a reference, as a fraction of its side.
        max_subjects: most subjects per sample (1..4).
        relation_probability: chance that a sample of 2+ subjects has one crossing with a depth relation.
        backgrounds: the backgrounds drawn from (names of ``ALL_BACKGROUNDS``); None: the default eight.
    """

    num_frames: int = 17
    height: int = 64
    width: int = 64
    fps: int = 8
    sprite_scale: float = 0.3
    reference_size: int = 64
    reference_scale: tuple[float, float] = (0.45, 0.9)
    max_subjects: int = 4
    relation_probability: float = 0.3
    backgrounds: tuple[str, ...] | None = None

    def check(self) -> None:
        check_num_frames(self.num_frames)
        unknown = sorted(set(self.backgrounds or ()) - set(ALL_BACKGROUNDS))
        if unknown or self.backgrounds == ():
            raise ValueError(f"backgrounds must be names of {sorted(ALL_BACKGROUNDS)}, got {list(self.backgrounds or ())}.")
        if not 1 <= self.max_subjects <= 4:
            raise ValueError(f"max_subjects must be 1..4, got {self.max_subjects}.")
        if not 0 < self.reference_scale[0] <= self.reference_scale[1] <= 1:
            raise ValueError(f"reference_scale must be 0 < low <= high <= 1, got {self.reference_scale}.")


def draw_scene(split: str, seed: int, index: int, config: "SpritesConfig") -> tuple[Scene, list[np.ndarray], list[dict]]:
    """Sample ``index`` of (split, seed) from its own random stream: the scene, its reference images
    and their placements (box, scale) under ``config`` (a :class:`SpritesConfig`; the online sprites'
    settings are one): the shards and the online scenes draw here."""
    rng = random.Random(f"sprites/{VERSION}/{split}/{seed}/{index}")
    scene = random_scene(rng, split, config.num_frames, config.height, config.width, config.sprite_scale,
                         config.max_subjects, config.relation_probability, config.backgrounds)
    references, placements = [], []
    for s in scene.subjects:
        scale = rng.uniform(*config.reference_scale)
        offset = (rng.uniform(-1, 1), rng.uniform(-1, 1))
        image, box = render_reference(s.appearance, config.reference_size, scale, offset)
        references.append(image)
        placements.append({"box": box, "scale": round(scale, 6)})
    return scene, references, placements


def make_sample(split: str, seed: int, index: int, config: SpritesConfig) -> tuple[str, dict[str, bytes], dict, np.ndarray, list[np.ndarray]]:
    """Sample ``index`` of ``split`` under ``seed``: its key, shard files, record, video and references.

    A pure function of (split, seed, index, config)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    scene, references, placements = draw_scene(split, seed, index, config)
    video, owner = render(scene, with_owner=True)
    key = f"sprites-{split}-{seed}-{index:06d}"
    visible = [[int((owner[f] == i).sum()) for f in range(scene.num_frames)] for i in range(len(scene.subjects))]
    record = {
        "id": key, "prompt": prompt_of(scene), "fps": config.fps, "num_frames": config.num_frames,
        "width": config.width, "height": config.height, "num_references": len(scene.subjects),
        "subjects": [f"the {ORDINALS[i]} subject" for i in range(len(scene.subjects))],
        "motions": [s.motion for s in scene.subjects], "split": split, "seed": seed, "index": index,
        "sprites": {**scene_to_json(scene), "boxes": boxes(scene), "visible_pixels": visible, "references": placements},
    }
    files = {"mp4": encode_video(video, config.fps), "json": json.dumps(record).encode()}
    for i, image in enumerate(references):
        files[f"ref{i}.png"] = _png(image)
    return key, files, record, video, references


def _sample_files(split: str, seed: int, config: SpritesConfig, index: int) -> tuple[str, dict[str, bytes], dict]:
    """``make_sample`` without the arrays (what a worker process sends back)."""
    key, files, record, _, _ = make_sample(split, seed, index, config)
    return key, files, record


def generate(out: str | Path, split: str, num_samples: int, seed: int = 0, config: SpritesConfig | None = None,
             samples_per_shard: int = 256, requests: bool = True, overwrite: bool = False, workers: int = 1) -> dict:
    """Write ``num_samples`` samples of ``split`` as shards ``<out>/shard-*.tar`` (the project's format),
    plus, with ``requests``, ``<out>/requests.jsonl`` and ``<out>/references/`` (predict requests of
    the same samples: prompt, references, size, seed). ``workers`` processes render in parallel; the
    output does not depend on their number. Returns the summary (also ``<out>/sprites.json``)."""
    config = config or SpritesConfig()
    config.check()
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    out = Path(out)
    lines, appearances, counts = [], set(), {m: 0 for m in MOTIONS}
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    render_one = partial(_sample_files, split, seed, config)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    samples = pool.imap(render_one, range(num_samples), chunksize=16) if pool else map(render_one, range(num_samples))
    with pool or nullcontext(), ShardWriter(out, max_samples=samples_per_shard, overwrite=overwrite) as writer:
        for index, (key, files, record) in enumerate(samples):
            writer.write(key, files)
            for s in record["sprites"]["subjects"]:
                appearances.add(Appearance(**s["appearance"]).key())
                counts[s["motion"]] += 1
            if requests:
                paths = []
                for i in range(len(record["sprites"]["references"])):
                    path = Path("references") / f"{key}.ref{i}.png"
                    write_atomic(out / path, files[f"ref{i}.png"])
                    paths.append(str(path))
                lines.append(json.dumps({"id": key, "prompt": record["prompt"], "references": paths, "seed": index,
                                         "num_frames": config.num_frames, "height": config.height, "width": config.width}))
        shards = writer.close()
    if requests:
        write_atomic(out / "requests.jsonl", ("\n".join(lines) + "\n").encode())
    summary = {
        "output": str(out), "split": split, "seed": seed, "samples": num_samples,
        "shards": [s.path for s in shards], "appearances": len(appearances), "motions": counts,
        "config": asdict(config), "version": VERSION,
    }
    write_atomic(out / "sprites.json", json.dumps(summary, indent=2).encode())
    return summary
