"""Errors about what the user gave (flags, files), and how the command-line tools report them.

A bad flag or file must end the run with one line that names the problem and the file, before any
long work starts, never with a traceback from deep inside the model or pycocotools. Code raises
:class:`InputError`; each command-line ``main`` runs under :func:`report_input_errors`, which prints
``prog: error: message`` and exits with status 2, as ``argparse`` does for a bad flag.
"""

from __future__ import annotations

import contextlib
import os
import sys


class InputError(ValueError):
    """A flag value, file or dataset that cannot be used; the message is one line that names it."""


@contextlib.contextmanager
def report_input_errors(prog: str):
    """Turn an :class:`InputError` raised inside the block into ``prog: error: ...`` and exit 2."""
    try:
        yield
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def require_file(path: str, what: str) -> str:
    """``path`` if it names a readable regular file; else an :class:`InputError` saying what is wrong
    (missing, a directory, unreadable). ``what`` says what the file is for, e.g. "checkpoint"."""
    if not os.path.exists(path):
        raise InputError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permissions)")
    return path


def require_directory(path: str, what: str) -> str:
    """``path`` if it names a directory; else an :class:`InputError`."""
    if not os.path.exists(path):
        raise InputError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise InputError(f"{what} {path} is a file, expected a directory")
    return path
