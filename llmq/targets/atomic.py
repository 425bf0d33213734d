"""Outputs appear only when complete: write under a temporary name beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from llmq.core.errors import LlmqError


def check_output_free(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an existing, non-empty output before any work is done, unless asked to replace it."""
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise LlmqError(f"output {target} already exists; choose another --out or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary directory; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    check_output_free(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other directory
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(target: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary file path beside `target`; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    check_output_free(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result should look like any other file
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
