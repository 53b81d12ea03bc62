"""openpi's wire format: msgpack, with numpy arrays as maps (the ``msgpack_numpy`` layout of openpi-client).

An array travels as the map ``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str>,
b"shape": [...]}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": <value>, b"dtype": ...}``; the
openpi client packs with ``use_bin_type`` so strings stay strings and those marker keys are bytes. This
module writes the same layout and reads it defensively: a malformed message raises :class:`ProtocolError`
with one line saying what was wrong, and nothing is ever unpickled (object, void and complex dtypes are
refused, as openpi refuses them).
"""

from __future__ import annotations

import math

import numpy as np

_REFUSED_KINDS = ("O", "V", "c")


class ProtocolError(ValueError):
    """A message that is not a valid observation; its text goes back to the client as the error reply."""


def _encode_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise TypeError(f"cannot send a numpy {obj.dtype} value")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def packb(obj) -> bytes:
    """``obj`` (dicts, lists, str, numbers, numpy arrays and scalars) as one msgpack message."""
    import msgpack  # the 'serve' extra; imported here so that `vitavla serve` can say so when it is missing

    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def _dtype(value) -> np.dtype:
    try:
        dtype = np.dtype(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"array dtype {value!r} is not a numpy dtype") from e
    if dtype.kind in _REFUSED_KINDS:
        raise ProtocolError(f"array dtype {dtype} is refused (object, void and complex arrays are not "
                            "accepted)")
    return dtype


def _decode_hook(obj: dict):
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"array shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise ProtocolError(f"array data must be bytes, got {type(data).__name__}")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"array of shape {tuple(shape)} and dtype {dtype} needs "
                                f"{math.prod(shape) * dtype.itemsize} bytes, the message has {len(data)}")
        # A copy: the message buffer is read-only, and torch.from_numpy warns on (and must not write to) it.
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"numpy scalar of dtype {dtype} cannot hold {obj.get(b'data')!r}") from e
    return obj


def unpackb(data: bytes):
    """One msgpack message (openpi layout) -> Python objects with numpy arrays; :class:`ProtocolError` if it
    is not one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary msgpack frame, got a {type(data).__name__} frame")
    import msgpack

    try:
        # strict_map_key=False: openpi's marker keys are bytes; observation keys are checked by the caller.
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ProtocolError(f"the message is not valid msgpack ({detail})") from e
