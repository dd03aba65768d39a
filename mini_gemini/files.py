"""Writing output files without ever replacing one that is there (a user's, or another writer's).

    with new_file(folder, "mgm-image", ".png") as (path, f):   # folder/mgm-image-3.png if 1 and 2 exist
        image.save(f, format="PNG")

Names are taken with `os.open(O_CREAT | O_EXCL)`: the file system itself refuses a name that exists, so two
writers at once (two runs into one folder, two threads of the app) never get the same one, and a file made by
anyone else is never touched. A write that fails removes the half-written file it created, and only that one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

MAX_TRIES = 1_000_000  # names tried before giving up (a folder of a million files named alike)


def create_new(folder: str | Path, stem: str, suffix: str) -> tuple[Path, int]:
    """Create `folder/{stem}-{n}{suffix}` for the smallest free n >= 1 (counting on from the files named alike
    already there) and return (path, open file descriptor, write-only). The folder is made if needed.

    Raises:
        OSError: the folder cannot be made or written, or no free name was found in MAX_TRIES tries.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a hint only (the O_EXCL loop is what makes the name safe): start after the files already named alike
    n = 1 + sum(1 for _ in folder.glob(f"{_glob_escape(stem)}-*{_glob_escape(suffix)}"))
    for _ in range(MAX_TRIES):
        path = folder / f"{stem}-{n}{suffix}"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            n += 1
    raise OSError(f"no free file name like {stem}-N{suffix} in {folder}")


@contextlib.contextmanager
def new_file(folder: str | Path, stem: str, suffix: str) -> Iterator[tuple[Path, BinaryIO]]:
    """(path, binary file open for writing) of a file made by `create_new`; removed again if the block fails."""
    path, fd = create_new(folder, stem, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield path, f
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file open for writing at exactly `path`, which must not exist yet (FileExistsError if it does:
    nothing is overwritten); removed again if the block fails."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file whose content replaces `path` in one step when the block ends (written next to it, then
    renamed over it): readers see the old file or the new one, never half of one. Use it only for a file this
    program made itself."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
