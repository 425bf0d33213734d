"""User-facing progress messages: one line each, on stderr, without breaking tqdm's bars."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

quiet = False


def info(message: str) -> None:
    if not quiet:
        tqdm.write(message, file=sys.stderr)


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr that steps aside when `quiet` is set (tests, library use)."""
    return tqdm(iterable, file=sys.stderr, disable=quiet, dynamic_ncols=True, **kwargs)
