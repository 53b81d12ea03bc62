"""The one resume-and-retry mechanism of every closed-loop evaluation (episodes and CALVIN chains, in-process
and in Lightning's test loop, one simulator or a pool).

A :class:`Ledger` holds every attempt of an evaluation's episodes, keyed by (task, episode, seed): what the
results files of earlier runs hold, plus what this run appends (one fsync'd JSON line per attempt, see
:mod:`vitavla.rollout.records`). :func:`run_attempts` runs the unfinished ones, in waves, until each is
finished; the caller supplies how one wave of attempts runs, so the same driver serves a sequential
simulator (waves of one), an :class:`~vitavla.rollout.parallel.EnvPool` and CALVIN's subtask waves.

The rule, in one place: an episode is finished when an attempt ended without a simulator error, or when this
run used ``1 + retries`` attempts on it. Errors recorded by earlier runs do not count against a rerun: a
recorded error is never the policy's (a policy exception stops the run), so a rerun, for example after the
simulator install was fixed, tries again.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Sequence

from vitavla.rollout.episode import EpisodeSpec
from vitavla.rollout.records import append_record, final_record, load_results, read_records, record_key

Key = tuple[int, int, int]
"""(task, episode, seed): :attr:`EpisodeSpec.key` and :func:`~vitavla.rollout.records.record_key`."""


class Ledger:
    """Attempts per episode: read from results files at construction, appended to ``path`` by :meth:`add`.

    ``path`` is this process's own file (a last line cut short by a kill is repaired); ``others`` are files
    that other processes may be appending to right now (ranks of a distributed run), read without repair.
    ``check(path, record)``: validates each loaded record (raising a clear error for a file that belongs
    to another evaluation).
    """

    def __init__(self, path: str | Path, retries: int = 1, others: Iterable[str | Path] = (),
                 check: Callable[[Path, dict], object] | None = None):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.path, self.retries = Path(path), int(retries)
        self.by_key: dict[Key, list[dict]] = {}
        for file in sorted({self.path, *map(Path, others)}):
            for record in load_results(file) if file == self.path else read_records(file):
                if check is not None:
                    check(file, record)
                self.by_key.setdefault(record_key(record), []).append(record)
        self.earlier = {key: len(records) for key, records in self.by_key.items()}

    def attempts(self, key: Key) -> int:
        """Attempts recorded so far, earlier runs included: the ``attempt`` number of the next one."""
        return len(self.by_key.get(key, []))

    def finished(self, key: Key) -> bool:
        records = self.by_key.get(key, [])
        this_run = len(records) - self.earlier.get(key, 0)
        return any(r["error"] is None for r in records) or this_run > self.retries

    def add(self, record: dict) -> None:
        """Append one attempt's record to ``path`` (flushed and fsync'd) and to the ledger."""
        append_record(self.path, record)
        self.by_key.setdefault(record_key(record), []).append(record)

    def final(self, key: Key) -> dict:
        """The record that counts: the first error-free attempt, else the last error."""
        return final_record(self.by_key[key])


Attempt = tuple[dict, object]
"""One attempt: its JSON record and the in-memory result (frames for videos and sheets)."""


def run_attempts(specs: Sequence[EpisodeSpec], ledger: Ledger,
                 run_wave: Callable[[list[EpisodeSpec]], Sequence[Attempt]], *, wave_size: int = 1,
                 on_attempt: Callable[[EpisodeSpec, dict, object], None] | None = None,
                 on_finished: Callable[[EpisodeSpec, dict], None] | None = None) -> list[dict]:
    """Run every unfinished spec of ``specs`` until the ledger says it is finished; the final records of all
    ``specs``, in order (finished ones of earlier runs are looked up, not rerun).

    ``run_wave(wave)`` runs one attempt of each of up to ``wave_size`` specs and returns their
    ``(record, result)`` in the same order; a simulator error goes in ``record["error"]``, never as an
    exception (an exception propagates: it is the policy's or the caller's bug). Whoever runs the wave also
    restarts a simulator that crashed, after every crash, so that no later episode runs on it. A crashed
    spec with retries left goes first into the next wave. ``on_attempt(spec, record, result)`` follows every
    recorded attempt (videos, first/last frames, warnings); ``on_finished(spec, final)`` follows a spec's
    last one (progress bars).
    """
    if wave_size < 1:
        raise ValueError(f"wave_size must be >= 1, got {wave_size}")
    queue = deque(s for s in specs if not ledger.finished(s.key))
    while queue:
        wave = [queue.popleft() for _ in range(min(wave_size, len(queue)))]
        attempts = list(run_wave(wave))
        if len(attempts) != len(wave):
            raise RuntimeError(f"a wave of {len(wave)} episodes returned {len(attempts)} attempts")
        retry = []
        for spec, (record, result) in zip(wave, attempts):
            if record_key(record) != spec.key:
                raise RuntimeError(f"an attempt at episode {spec.key} was recorded as {record_key(record)}")
            ledger.add(record)
            if on_attempt is not None:
                on_attempt(spec, record, result)
            if not ledger.finished(spec.key):
                retry.append(spec)
            elif on_finished is not None:
                on_finished(spec, ledger.final(spec.key))
        queue.extendleft(reversed(retry))
    return [ledger.final(s.key) for s in specs]


__all__ = ["Attempt", "Ledger", "run_attempts"]
