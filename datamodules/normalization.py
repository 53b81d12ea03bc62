"""Fitting and caching the dataset statistics of a :class:`~vitavla.normalizer.Normalizer`.

One normalizer is fitted per dataset and cached as JSON next to a fingerprint of the files, so the pass over
every action runs once. The class itself lives in :mod:`vitavla.normalizer` (rollouts and serving read it
too); it is re-exported here so that ``datamodules.normalization.Normalizer`` keeps working.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vitavla.errors import writable_dir
from vitavla.normalizer import Mode, Normalizer

__all__ = ["Mode", "Normalizer", "cached_normalizer", "dataset_fingerprint"]


def dataset_fingerprint(files: list[Path], extra: str = "") -> str:
    """Cheap identity of a dataset on disk: names, sizes and mtimes of its files plus reader options."""
    h = hashlib.sha256(extra.encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def cached_normalizer(cache_dir: str | Path, fingerprint: str, compute) -> Normalizer:
    """Load ``<cache_dir>/stats-<fingerprint>.json`` or compute it once with ``compute()`` and save it."""
    path = Path(cache_dir).expanduser() / f"stats-{fingerprint}.json"
    if path.is_file():
        return Normalizer.load(path)
    # A read-only cache is fine while it holds the statistics; one that cannot take them fails before the
    # pass over every action of the dataset, not after it.
    writable_dir(path.parent, "data.init_args.stats_cache_dir")
    norm = compute()
    norm.save(path)
    return norm
