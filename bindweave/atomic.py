"""Files and folders written whole or not at all: into a temporary name beside the target, then
renamed over it. An exception (or a crash) mid-write leaves the previous file as it was and, on an
exception, no temporary behind; a reader never sees half a file.

Every writer of the project goes through :class:`AtomicPath` (``write_atomic`` for bytes in memory),
so temporaries have one naming scheme, ``.<name>.tmp-<8 hex>``: hidden, and matched by no glob of
real files (``*.tar``, ``model*.safetensors``, ``<id>.mp4``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name in ``path``'s folder: ``.<name>.<tag>-<8 hex>``."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


class AtomicPath:
    """A temporary file (or, with ``folder``, folder) beside ``path``, created at once, that
    :meth:`commit` renames over ``path`` and :meth:`discard` removes.

    As a context manager it yields the temporary path, commits on success and discards on an
    exception (which propagates)::

        with AtomicPath(target) as tmp:
            save_file(state, tmp)

    The temporary file gets the permissions of a newly created file (``0o666`` less the umask). A
    folder is swapped in with two renames: an existing ``path`` moves aside, the new folder moves in,
    then the old one is deleted (put back if the second rename fails).

    Args:
        path: the file or folder to write; its parent folder is created.
        folder: write a folder instead of a file.
    """

    def __init__(self, path: str | Path, folder: bool = False) -> None:
        self.path, self.folder = Path(path), folder
        # A folder by its real location: "." or a symlinked folder is swapped where it really is.
        self._where = self.path.resolve() if folder else self.path
        self._where.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_sibling(self._where)
        if folder:
            self.tmp.mkdir()
        else:
            os.close(os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))

    def commit(self) -> Path:
        """Move the temporary into place (it replaces ``path``); returns ``path``."""
        try:
            if self.folder:
                self._swap_folder()
            else:
                os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Remove the temporary; ``path`` is left as it was."""
        if self.folder:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

    def _swap_folder(self) -> None:
        where = self._where
        old = temporary_sibling(where, "old") if where.exists() else None
        if old is not None:
            where.rename(old)
        try:
            self.tmp.rename(where)
        except BaseException:
            if old is not None and not where.exists():  # put the previous folder back
                old.rename(where)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # only once the new one is in place

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see :class:`AtomicPath`); returns ``path``."""
    with AtomicPath(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
