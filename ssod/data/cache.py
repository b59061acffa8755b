"""The dataset cache: built-in testbeds are generated once into a directory named by their recipe.

``build_once(target, build)`` is how every generated dataset lands there: the builder writes
into a private temp dir beside ``target``, which is then renamed into place. A rename is
atomic, so ``target`` is either absent or complete, even if a builder is killed; two
processes building at once both finish, the loser discards its copy and uses the winner's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def default_cache_dir() -> Path:
    """`$SSOD_CACHE_DIR` if set, else `~/.cache/ssod`."""
    configured = os.environ.get("SSOD_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ssod"


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Make ``target`` by ``build(empty_dir)`` unless it exists already (see the module doc)."""
    target = Path(target)
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent))
    try:
        build(building)
        building.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(building, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
