"""The LeRobotDataset v3 file layout shared by the reader (:mod:`datamodules.lerobot`) and the writer
(:mod:`datamodules.lerobot_write`): the metadata paths and columns, the optional pyarrow / PyAV imports, and
parquet helpers that turn a bad file into a :class:`~datamodules.base.DataError` naming it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from datamodules.base import DataError
from vitavla.errors import UserFacingError

INFO, TASKS, STATS, EPISODES_DIR = "meta/info.json", "meta/tasks.parquet", "meta/stats.json", "meta/episodes"
INDEX_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "task_index")
EPISODE_COLUMNS = ("episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
                   "data/file_index")
VIDEO_COLUMNS = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")


def bad_data(path, key: str, problem: str) -> NoReturn:
    """Raise the :class:`DataError` naming the file, the key and what was expected."""
    raise DataError(path, key, problem)


class MissingExtra(UserFacingError, ImportError):
    """pyarrow or PyAV is not installed: the message names the extra that brings them."""


def lerobot_deps():
    """pyarrow and PyAV, imported on first use (the ``lerobot`` extra), with one error naming the extra."""
    try:
        import av
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingExtra(f"LeRobot datasets need pyarrow and PyAV: pip install -e '.[lerobot]' "
                           f"({e})") from e
    return pq, av


def read_parquet(path: Path, columns: Sequence[str] | None = None):
    """A parquet file as a pyarrow table; a missing or unreadable file is a :class:`DataError`."""
    pq, _ = lerobot_deps()
    import pyarrow as pa

    if not path.is_file():
        bad_data(path, str(path.name), "missing file (LeRobot v3 layout: see meta/info.json's path templates)")
    try:
        schema = pq.read_schema(path)
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                bad_data(path, missing[0], f"column missing; columns present: {schema.names}")
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as e:
        bad_data(path, "<file>", f"not a readable parquet file: {e}")


def column_matrix(table, path: Path, key: str, dim: int | None = None) -> np.ndarray:
    """A vector feature column (list or fixed-size list of numbers, or a scalar) as an (N, d) float64
    array."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    n = len(col)
    t = pa.types
    if t.is_list(col.type) or t.is_large_list(col.type) or t.is_fixed_size_list(col.type):
        if col.null_count:
            bad_data(path, key, "has null rows; expected one vector per frame")
        lengths = np.asarray(pa.compute.list_value_length(col))
        if n and (lengths != lengths[0]).any():
            bad_data(path, key, f"rows have different lengths {sorted(set(lengths.tolist()))[:5]}; expected one "
                             f"fixed length")
        width = int(lengths[0]) if n else (dim or 0)
        values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
        out = values.reshape(n, width)
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        out = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(n, 1)
    else:
        bad_data(path, key, f"has type {col.type}; expected a list of numbers per frame")
    if dim is not None and out.shape[1] != dim:
        bad_data(path, key, f"has {out.shape[1]} values per frame; meta/info.json features give shape [{dim}]")
    return out


def scalar_column(table, key: str) -> np.ndarray:
    return np.asarray(table.column(key).combine_chunks().to_numpy(zero_copy_only=False))
