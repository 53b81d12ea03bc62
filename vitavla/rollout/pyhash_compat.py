"""A pure-Python stand-in for the one ``pyhash`` hasher that calvin_models uses.

``calvin_models`` (package ``calvin_agent``) imports ``pyhash`` at module level in
``calvin_agent/evaluation/utils.py``, which ``get_sequences`` (the official chains) and
``get_env_state_for_initial_condition`` (a chain's symbolic state -> ``robot_obs`` / ``scene_obs``) both go
through. ``pyhash`` is a C++ extension that no longer builds on Python >= 3.10, and only its ``fnv1_32`` is
used: the seed of the block-placement shuffle for a symbolic initial state is
``fnv1_32()(str(initial_condition.values()))``.

What this reproduces of ``pyhash.fnv1_32`` (checked against the values its own test suite asserts):

* FNV-1, 32 bit: for each byte, multiply by the FNV prime 16777619 (mod 2**32), then xor the byte;
* the start value is the hasher's ``seed``, 0 by default -- *not* FNV's offset basis 2166136261;
* ``bytes`` are hashed as they are, ``str`` as its UTF-16-LE encoding without a byte-order mark;
* several arguments are hashed one after the other, each continuing from the previous value, and a
  ``seed=`` keyword overrides the start value.

:func:`install` registers this as the ``pyhash`` module when the real one is not importable, so that
``pip install --no-deps calvin_models`` works on current Python; a real ``pyhash`` always wins.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

FNV_32_PRIME = 16777619
_MASK_32 = 0xFFFFFFFF


def fnv1_32_bytes(data: bytes, start: int = 0) -> int:
    """FNV-1 (multiply, then xor) of ``data`` over 32 bits, from the start value ``start``."""
    h = int(start) & _MASK_32
    for byte in data:
        h = ((h * FNV_32_PRIME) & _MASK_32) ^ byte
    return h


def _as_bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-16-le")  # what pyhash hashes for a str on little-endian machines
    raise TypeError(f"fnv1_32 hashes bytes or str, got {type(value).__name__}")


class fnv1_32:  # noqa: N801 -- named as pyhash names it, since calvin_agent calls pyhash.fnv1_32()
    """``pyhash.fnv1_32``: ``fnv1_32(seed=0)(*data, seed=None) -> int``."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, *data: object, seed: int | None = None) -> int:
        h = self.seed if seed is None else int(seed)
        for item in data:
            h = fnv1_32_bytes(_as_bytes(item), h)
        return h


def install() -> bool:
    """Make ``import pyhash`` give this module's ``fnv1_32`` when no real ``pyhash`` is installed.

    Returns True when the stand-in was registered (now or earlier), False when a real ``pyhash`` is there.
    """
    existing = sys.modules.get("pyhash")
    if existing is not None:
        return getattr(existing, "__vitavla_stand_in__", False)
    if importlib.util.find_spec("pyhash") is not None:
        return False
    module = types.ModuleType("pyhash", "vitavla's pure-Python stand-in for pyhash (fnv1_32 only); see "
                                        "vitavla.rollout.pyhash_compat")
    module.__spec__ = importlib.machinery.ModuleSpec("pyhash", None)  # so importlib.util.find_spec works on it
    module.fnv1_32 = fnv1_32
    module.__vitavla_stand_in__ = True
    sys.modules["pyhash"] = module
    return True
