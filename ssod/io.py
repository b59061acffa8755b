"""Atomic file writes: a reader (another process, a resumed run) sees the old file or the
whole new one, never half of it, even when the writer is killed mid-write.

The lowest layer: every module may use it, it imports nothing of ssod.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(data: Any, path: Path) -> None:
    """Write ``data`` as compact json, atomically (see ``write_text_atomic``)."""
    write_text_atomic(json.dumps(data, separators=(",", ":")), path)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` via a temp file + ``os.replace``: readers never see a half-written
    file, even if the writer is killed. The file is readable by all (mode 644), as a plain
    write would leave it, not private as a temp file starts."""
    write_bytes_atomic(text.encode("utf-8"), path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """``write_text_atomic`` for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
