"""Progress of long command-line work (``eval``, ``data inspect --check``, ``weights export``).

On a terminal: a tqdm bar on stderr. Elsewhere (a log file, CI, a pipe): a plain line every
``every`` seconds, and a last line at the end if any was printed, so a short run stays silent and
a long one leaves a readable log instead of carriage-return soup::

    eval shipped: 120/256 (47%), 31 s, 3.9 sample/s
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, stream: IO[str] | None = None, every: float = 30.0) -> Iterator[T]:
    """Yield from ``iterable`` while showing how far it got.

    Args:
        iterable: the work, one item at a time.
        total: how many items (default: ``len(iterable)`` when it has one).
        desc: what is being done (``"export"``).
        unit: what an item is (``"tensor"``).
        enabled: False yields without a word.
        stream: where it is shown (default stderr); a terminal gets a bar, anything else lines.
        every: seconds between lines when ``stream`` is not a terminal.
    """
    stream = stream or sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled:
        yield from iterable
        return
    if getattr(stream, "isatty", lambda: False)():
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    done, printed = 0, False
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            print(_line(desc, done, total, now - start, unit), file=stream, flush=True)
            last, printed = now, True
    if printed:
        print(_line(desc, done, total, time.monotonic() - start, unit) + " done", file=stream, flush=True)


def _line(desc: str, done: int, total: int | None, seconds: float, unit: str) -> str:
    count = f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done}"
    rate = f", {done / seconds:.1f} {unit}/s" if seconds > 0 else ""
    return f"{desc + ': ' if desc else ''}{count}, {seconds:.0f} s{rate}"
