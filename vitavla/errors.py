"""Errors whose message is the whole story, and the setup-time check of output directories.

A :class:`UserFacingError` names the file or config key and what was expected, so ``vitavla`` prints its
message as one line instead of a traceback (see ``cli._user_message``). Bad input that our own checks
detect raises one (or a subclass: ``DataError``, ``CheckpointMismatchError``, ``CheckpointReadError``);
anything else still shows its traceback, because it is a bug to read, not a usage mistake.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class UserFacingError(Exception):
    """Bad input that the message fully describes: it names the file or key and what was expected."""


def writable_dir(path: str | Path, key: str) -> Path:
    """``path`` as a directory that exists and takes a new file, else a :class:`UserFacingError` naming ``key``.

    Probed by creating (and deleting) a file rather than with ``os.access``: that also catches read-only
    mounts, a full disk's inode table and a path blocked by a file, and works when running as root, for
    whom ``os.access`` always says yes. Called at setup, so a run fails before the work it was to keep.
    """
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as err:
        raise UserFacingError(f"{key}: {p} is not a writable directory ({err.strerror or err})") from err
    return p


class MissingDependencyError(UserFacingError, ImportError):
    """A package the configured component needs is not installed (or its install is broken); the message
    names the package, the component and how to install it. Never a simulator crash: retrying cannot fix it."""


class ConfigError(UserFacingError, ValueError):
    """A setting or input file that can never work (wrong shape, wrong camera size, malformed state): every
    attempt would fail the same way, so it stops the run instead of being recorded as an episode error."""
