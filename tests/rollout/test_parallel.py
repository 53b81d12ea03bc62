"""Parallel closed-loop evaluation: EnvPool workers, batched waves, crashes, resume.

Workers are spawned processes that import torch, so pools are expensive on a busy machine: one pool is
shared by the equivalence tests, and each evaluate() call below starts a 2-worker pool.
"""

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from teachers.base import ActionOutput
from tests.conftest import tiny_policy
from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.executors import ChunkExecutor, FirstActionExecutor, TemporalEnsembleExecutor
from vitavla.rollout.parallel import EnvPool, EnvPoolError, run_wave
from vitavla.rollout.runner import EpisodeSpec, evaluate, load_results, run_episode
from vitavla.streaming import StreamingPolicy


class ReachingBatch:
    """Deterministic batched scripted policy: rows whose instruction names one of ``solves`` head for the
    goal read from the state (x, y, gx, gy), the others walk away (a guaranteed failure)."""

    def __init__(self, solves=("top left",), chunk=3, speed=0.25, fail_on_reset=None):
        self.solves, self.chunk, self.speed, self.fail_on_reset = solves, chunk, speed, fail_on_reset
        self.resets = 0
        self.selected: list[list[int]] = []
        self.batch_sizes: list[int] = []

    def reset(self):
        self.resets += 1
        if self.fail_on_reset is not None and self.resets == self.fail_on_reset:
            raise KeyboardInterrupt("evaluation stopped")

    def select(self, rows):
        self.selected.append(list(rows))

    def step(self, obs):
        s = obs.state
        self.batch_sizes.append(s.shape[0])
        move = (s[:, 2:4] - s[:, 0:2]) / self.speed
        sign = torch.tensor([1.0 if any(n in i for n in self.solves) else -1.0 for i in obs.instruction])
        arm = torch.zeros(s.shape[0], self.chunk, 6)
        arm[:, :, :2] = (sign[:, None] * move).clamp(-1, 1)[:, None]
        return ActionOutput(arm, torch.full((s.shape[0], self.chunk, 1), 3.0))


@dataclass
class FlakyEnv(ScriptedStandInEnv):
    """Crashes (exception) or dies (process exit) at step ``crash_at`` of the listed episodes, only on their
    first attempt: a marker file in ``marker_dir`` remembers the attempt across env rebuilds and processes."""

    marker_dir: str = ""
    flaky_at: int = 1
    raise_episodes: tuple = ()
    die_episodes: tuple = ()

    def step(self, action):
        key = (self._task, self._episode)
        marker = Path(self.marker_dir) / f"{key[0]}_{key[1]}"
        if self._t == self.flaky_at and not marker.exists():
            if key in self.die_episodes:
                marker.touch()
                os._exit(3)  # like a segfault: no exception, no answer
            if key in self.raise_episodes:
                marker.touch()
                raise RuntimeError(f"flaky simulator crash at step {self._t}")
        return super().step(action)


def make_env(**kw):
    return ScriptedStandInEnv(steps=8, crash_at=3, crash_episodes={(1, 2)}, video_size=48, **kw)


def specs(tasks=2, episodes=3, seed=7):
    return [EpisodeSpec(t, e, seed=seed) for t in range(tasks) for e in range(episodes)]


@pytest.fixture(scope="module")
def pool():
    with EnvPool(make_env(), 3, timeout=60) as p:
        yield p
    assert p._slots == [None] * 3  # closed


def same(a, b):
    """Per-episode results equal, timings aside."""
    assert (a.task, a.episode, a.success, a.steps, a.error) == (b.task, b.episode, b.success, b.steps, b.error)
    assert (a.frames is None) == (b.frames is None)
    if a.frames is not None:
        assert len(a.frames) == len(b.frames) and all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert a.instruction == b.instruction and (a.first_last is None) == (b.first_last is None)
    if a.first_last is not None:
        assert all(np.array_equal(x, y) for x, y in zip(a.first_last, b.first_last))


@pytest.mark.parametrize("executor", [FirstActionExecutor, lambda: ChunkExecutor(2)])
def test_waves_equal_sequential_episodes_with_a_scripted_policy(pool, executor):
    env = make_env()
    for wave in (specs()[:3], specs()[3:]):  # task 0 (solved, early stops), task 1 (fails, one crash)
        policy = ReachingBatch()
        got = run_wave(pool, policy, wave, executor, image_size=16, settle_steps=2, record_frames=True)
        want = [run_episode(env, ReachingBatch(), executor(), s, image_size=16, settle_steps=2,
                            record_frames=True) for s in wave]
        for g, w in zip(got, want):
            same(g, w)
            assert g.seconds_sim > 0 and g.seconds_policy > 0
    # The last wave: (1, 2) crashed at step 3 and left the batch; task 1 episodes ran to max_steps.
    # Env steps count the 2 settle steps: 6 policy steps to the env's limit, the crash at policy step 1.
    assert [(r.success, r.steps, r.error is None) for r in got] == [(False, 6, True), (False, 6, True),
                                                                    (False, 1, False)]
    assert "RuntimeError: scripted simulator crash at step 3" == got[2].error
    assert policy.batch_sizes[-1] == 2 and [0, 1] in policy.selected


def test_waves_equal_sequential_episodes_with_the_tiny_streaming_policy(pool):
    stream = StreamingPolicy(tiny_policy("internvl"))
    wave = [EpisodeSpec(1, 2, 7), EpisodeSpec(0, 0, 7), EpisodeSpec(1, 0, 7)]
    got = run_wave(pool, stream, wave, TemporalEnsembleExecutor, image_size=224)
    env = make_env()
    want = [run_episode(env, StreamingPolicy(stream.policy), TemporalEnsembleExecutor(), s, image_size=224)
            for s in wave]
    for g, w in zip(got, want):
        same(g, w)
    assert got[0].error is not None and got[0].steps == 3  # its row was dropped with select
    assert len(stream._instruction) == 2 and stream.held_steps == max(r.steps for r in got[1:])


def test_workers_render_the_video_camera_only_for_recorded_episodes(pool):
    wave = [EpisodeSpec(0, 1, 7), EpisodeSpec(1, 1, 7), EpisodeSpec(0, 2, 7)]
    flags = [True, False, True]
    got = run_wave(pool, ReachingBatch(), wave, FirstActionExecutor, image_size=16, record_frames=flags)
    env = make_env()
    want = [run_episode(env, ReachingBatch(), FirstActionExecutor(), s, image_size=16, record_frames=f)
            for s, f in zip(wave, flags)]
    for g, w in zip(got, want):
        same(g, w)
    # Recorded: every frame from the 48 px video camera, the outcome frame included. Not recorded (on a
    # worker whose env recorded in earlier tests): no frames, and its first/last are the 32 px policy view.
    assert [f.shape for f in got[0].frames] == [(48, 48, 3)] * (got[0].steps + 1)
    assert got[1].frames is None and [f.shape for f in got[1].first_last] == [(32, 32, 3)] * 2
    assert got[2].first_last[1].shape == (48, 48, 3)


def test_env_that_does_not_pickle_is_refused_before_any_worker_starts():
    with pytest.raises(TypeError, match="must pickle"):
        EnvPool(lambda: ScriptedStandInEnv(), 1)


def test_evaluate_parallel_retries_crashes_and_resumes_with_identical_totals(tmp_path):
    run = dict(image_size=16, progress=False)
    others = set(mp.active_children())  # e.g. the shared pool's workers, when it is alive
    full = evaluate(make_env, ReachingBatch(), specs(), FirstActionExecutor, str(tmp_path / "seq.jsonl"), **run)
    assert full["errors"] == 1 and full["episodes"] == 5 and full["successes"] == 3

    # Flaky: (0, 1) raises and (1, 0) kills its worker, each on the first attempt only; both are retried.
    markers = tmp_path / "markers"
    markers.mkdir()
    flaky = FlakyEnv(steps=8, raise_episodes=((0, 1),), die_episodes=((1, 0),), marker_dir=str(markers))
    path = tmp_path / "flaky.jsonl"
    out = evaluate(lambda: flaky, ReachingBatch(), specs(), FirstActionExecutor, str(path), num_envs=2, **run)
    assert out["errors"] == 0 and out["episodes"] == 6 and out["successes"] == 3
    recs = load_results(path)
    crashed = {(r["task"], r["episode"]): r["error"] for r in recs if r["error"] is not None}
    assert crashed.keys() == {(0, 1), (1, 0)} and len(recs) == 8
    assert "flaky simulator crash" in crashed[0, 1] and "exited with code 3" in crashed[1, 0]
    assert sorted((r["task"], r["episode"], r["attempt"]) for r in recs if r["attempt"]) == [(0, 1, 1), (1, 0, 1)]
    assert set(mp.active_children()) <= others  # the pool, including the restarted worker, is gone

    # Stopped by Ctrl-C while starting the 2nd wave of 2: the pool closes, 2 episodes are on disk.
    path = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(make_env, ReachingBatch(fail_on_reset=2), specs(), FirstActionExecutor, str(path),
                 num_envs=2, **run)
    assert set(mp.active_children()) <= others
    assert len(load_results(path)) == 2
    policy = ReachingBatch()
    again = evaluate(make_env, policy, specs(), FirstActionExecutor, str(path), num_envs=2, **run)
    assert again == full and policy.resets == 3  # 4 remaining specs, one crash retried alone
    assert len(load_results(path)) == 7


def test_shared_pools_reuse_one_pool_per_env_and_drop_a_broken_one():
    from vitavla.rollout.parallel import acquire_pool, release_pool, shared_pools

    env = make_env()
    alone = acquire_pool(env, 1)
    release_pool(alone)
    assert alone.closed  # outside a block, release closes
    with shared_pools():
        p = acquire_pool(env, 1, timeout=30)
        release_pool(p)
        assert not p.closed and acquire_pool(make_env(), 1, timeout=30) is p  # equal env bytes: same pool
        other = acquire_pool(make_env(num_task=3), 1, timeout=30)
        assert other is not p
        release_pool(p, broken=True)  # stopped mid-command: never handed out again
        assert p.closed
        q = acquire_pool(env, 1, timeout=30)
        assert q is not p and run_wave(q, ReachingBatch(), specs()[:1], FirstActionExecutor, image_size=16)[0].success
    assert q.closed and other.closed


def test_worker_side_imports_stay_free_of_lightning():
    # A spawned worker imports the console script (cli), its target's module and the env's adapter before it
    # unpickles the env; with Lightning among them every worker start cost 6-9 s more.
    import subprocess
    import sys

    code = ("import sys, cli, vitavla.rollout.env_worker, vitavla.rollout.libero_env, vitavla.rollout.aloha_env, "
            "datamodules.normalization; "
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lazy_package_exports_resolve_to_their_classes():
    import datamodules
    import vitavla.rollout as rollout
    from datamodules.libero import LiberoDataModule
    from vitavla.rollout.runner import run_episode

    assert datamodules.LiberoDataModule is LiberoDataModule and rollout.run_episode is run_episode
    for package in (datamodules, rollout):
        assert all(getattr(package, name) is not None for name in package.__all__)
        assert dir(package) == sorted(package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        datamodules.Nope


class DiesWhenUnpickled(ScriptedStandInEnv):
    """Kills the worker process while it rebuilds the env, before it can report anything."""

    def __setstate__(self, state):
        os._exit(5)


def test_a_worker_that_dies_while_starting_is_a_clear_pool_error():
    with pytest.raises(EnvPoolError, match="env worker 0 exited with code 5 while starting"):
        EnvPool(DiesWhenUnpickled(), 1, start_timeout=60)
