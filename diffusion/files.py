"""Writing a folder so that it appears whole or not at all (datasets, the tiny CLIP, checkpoints, exports),
and the names of cached folders (a hash of the settings that made them).

Everything is written into a hidden sibling first and renamed into place once complete, so a process
killed at any moment never leaves a half-written folder that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def config_hash(*parts: dict) -> str:
    """The name of what `parts` (plain settings) make: the first 10 hex digits of their JSON's SHA-256."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def check_folder_path(path: str | Path, flag: str) -> None:
    """A command's output folder may be new or a folder, never an existing file (UserError naming `flag`)."""
    from diffusion.errors import UserError

    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path} is a file; {flag} names the folder the output goes into: choose a folder")


def staging_dir(final: Path, tag: str = "partial") -> Path:
    """A fresh, empty hidden sibling of `final` (.<name>.<tag>) to write into before `commit_dir`."""
    tmp = final.parent / f".{final.name}.{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder into place (replacing an older one of the same name)."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write into the yielded folder: it becomes `final` when the block ends, and is removed if it fails.
    The staging name carries the process id, so two processes writing the same folder do not collide."""
    final = Path(final)
    tmp = staging_dir(final, f"partial-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)
