"""The one resume-and-retry mechanism (vitavla.rollout.ledger): finished/attempts/final over results files,
and run_attempts' waves, with a scripted stand-in for the simulator."""

from __future__ import annotations

import json

import pytest

from vitavla.rollout.episode import EpisodeSpec
from vitavla.rollout.ledger import Ledger, run_attempts


def record(spec: EpisodeSpec, attempt: int, error: str | None = None, success: bool = True) -> dict:
    return {"task": spec.task_index, "episode": spec.episode_index, "seed": spec.seed, "attempt": attempt,
            "error": error, "success": success and error is None}


def scripted(ledger: Ledger, crashes: dict[tuple, int], log: list):
    """A wave runner whose episode ``key`` crashes on its first ``crashes[key]`` attempts of this run."""
    seen: dict[tuple, int] = {}

    def run_wave(wave):
        log.append([s.episode_index for s in wave])
        out = []
        for spec in wave:
            n = seen[spec.key] = seen.get(spec.key, 0) + 1
            error = "sim crash" if n <= crashes.get(spec.key, 0) else None
            out.append((record(spec, ledger.attempts(spec.key), error), f"result {spec.episode_index}"))
        return out

    return run_wave


def test_waves_retry_a_crash_first_and_return_final_records_in_order(tmp_path):
    specs = [EpisodeSpec(0, i) for i in range(5)]
    ledger, waves, seen, done = Ledger(tmp_path / "r.jsonl", retries=1), [], [], []
    finals = run_attempts(specs, ledger, scripted(ledger, {(0, 1, 0): 1, (0, 3, 0): 5}, waves), wave_size=2,
                          on_attempt=lambda s, r, res: seen.append((s.episode_index, r["attempt"], res)),
                          on_finished=lambda s, final: done.append(s.episode_index))
    # Episode 1 crashes once and leads the next wave; episode 3 crashes on both of its attempts.
    assert waves == [[0, 1], [1, 2], [3, 4], [3]]
    assert [(r["episode"], r["attempt"], r["error"]) for r in finals] == [
        (0, 0, None), (1, 1, None), (2, 0, None), (3, 1, "sim crash"), (4, 0, None)]
    assert seen[:3] == [(0, 0, "result 0"), (1, 0, "result 1"), (1, 1, "result 1")]
    assert sorted(done) == [0, 1, 2, 3, 4] and len(done) == 5  # once per spec, after its last attempt
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and lines[-1] == finals[3]


def test_a_rerun_skips_finished_episodes_and_retries_recorded_crashes(tmp_path):
    path = tmp_path / "r.jsonl"
    specs = [EpisodeSpec(0, i) for i in range(3)]
    first = Ledger(path, retries=0)
    run_attempts(specs, first, scripted(first, {(0, 2, 0): 1}, []))
    again = Ledger(path, retries=0)
    assert [again.finished(s.key) for s in specs] == [True, True, False]  # an earlier crash is retried
    assert again.attempts(specs[2].key) == 1
    waves = []
    finals = run_attempts(specs, again, scripted(again, {}, waves))
    assert waves == [[2]] and [r["attempt"] for r in finals] == [0, 0, 1] and finals[2]["error"] is None
    # Another rank's file counts too (read without repair); a cut-off last line of our own is repaired.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(record(EpisodeSpec(1, 0), 0)) + "\n" + '{"task": 1, "epis')
    with open(path, "a") as f:
        f.write('{"task": 0, "episode": 9')
    merged = Ledger(path, others=[other])
    assert merged.finished((1, 0, 0)) and not merged.finished((1, 1, 0))
    assert path.read_text().endswith("}\n") and other.read_text().endswith('"epis')


def test_a_wave_that_returns_another_episode_is_an_error(tmp_path):
    ledger = Ledger(tmp_path / "r.jsonl")
    with pytest.raises(RuntimeError, match=r"episode \(0, 0, 0\) was recorded as \(0, 7, 0\)"):
        run_attempts([EpisodeSpec(0, 0)], ledger, lambda wave: [(record(EpisodeSpec(0, 7), 0), None)])
    with pytest.raises(RuntimeError, match="a wave of 1 episodes returned 0 attempts"):
        run_attempts([EpisodeSpec(0, 0)], ledger, lambda wave: [])
    with pytest.raises(ValueError, match="retries must be >= 0"):
        Ledger(tmp_path / "x.jsonl", retries=-1)
