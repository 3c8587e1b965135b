"""Atomic file writes: every file the library writes goes through :func:`atomic_write`.

The content is written to a temporary file in the destination folder, flushed and ``fsync``-ed, and
renamed over the destination with :func:`os.replace` (atomic on POSIX and Windows), so an interrupted
process (SIGKILL, power loss, a full disk) leaves either the old file or the new one, never a
half-written one. Errors while writing (read-only folder, disk full) propagate as :class:`OSError`
after the temporary file is removed; the previous file at ``path`` is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_json", "atomic_write_text"]


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a binary temporary file, fsync it, rename it to ``path``, fsync the folder.

    A failed write (read-only folder, disk full) raises the same ``OSError`` subclass with a message naming
    ``path`` (and saying that the previous version is kept, when there is one).
    """
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        reason = err.strerror or str(err)
        kept = " (the previous version is kept)" if path.exists() else ""
        raise type(err)(err.errno, f"cannot write {str(path)!r}: {reason}{kept}") from err
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(obj: Any, path: str | os.PathLike, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (plus a final newline) to ``path`` atomically.

    ``obj`` must be JSON-serialisable (convert tensors and non-finite floats first).
    """
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", path)
