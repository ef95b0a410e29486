"""Atomic file writes: readers (a sweep polling a result, a viewer opening a mask) never see half a file, and a
crash leaves the previous file or none, never a truncated one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Writes through a temporary file in the same folder, then renames: readers never see half a file."""
    suffix = "".join(path.suffixes)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes owner-only files; masks are ordinary outputs
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
