"""Episode-record files of an evaluation: one JSON line per attempt, appended and fsync'd as each attempt ends,
so a killed evaluation resumes from its files. Shared by the sequential runner, the Lightning rollout callbacks
and the CALVIN chain runners (a chain record has the same ``task`` / ``episode`` / ``seed`` / ``error`` keys)."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

IMAGE_FIELDS = ("frames", "first_last")


def result_record(res) -> dict:
    """The JSON-able fields of an :class:`~vitavla.rollout.episode.EpisodeResult` (images left out; not
    ``asdict``, which would deep-copy them)."""
    return {f.name: getattr(res, f.name) for f in fields(res) if f.name not in IMAGE_FIELDS}


def load_results(path: str | Path) -> list[dict]:
    """Records of a results file. A last line cut short by a kill is removed from the file (re-run later)."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(raw))
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def read_records(path: Path) -> list[dict]:
    """Complete lines of another process's file, read-only: that process may be appending to it right now, so
    a partial last line is skipped, never truncated (only the owner repairs its file, via load_results)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw[: raw.rfind(b"\n") + 1].decode().splitlines() if line.strip()]


def append_record(path: Path, record: dict) -> None:
    """Append one attempt as a JSON line, flushed and fsync'd: a finished episode must survive a kill right
    after it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record_key(record: dict) -> tuple[int, int, int]:
    """What identifies an episode across attempts and processes: (task, episode, seed)."""
    return record["task"], record["episode"], record["seed"]


def final_record(records: list[dict]) -> dict:
    """The record that counts for an episode: its first error-free attempt, else its last error."""
    done = [r for r in records if r["error"] is None]
    return done[0] if done else records[-1]


__all__ = ["append_record", "final_record", "load_results", "read_records", "record_key", "result_record"]
