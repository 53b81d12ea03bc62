"""Closed-loop evaluation with several simulators in parallel and one batched policy call per control step.

:class:`EnvPool` runs N worker processes, each owning one :class:`RolloutEnv`; :func:`run_wave` runs up to N
episodes concurrently on it: every control step sends the actions of all running episodes (the simulators
step in parallel), collects their observations, then makes ONE policy call on the batch of running episodes.

Workers are started with the ``spawn`` method: ``fork`` would copy torch's thread pools and any live
EGL/OpenGL context of the parent, both unsafe after fork. A worker receives its env pickled (an instance whose
simulator is created lazily on first reset, or a picklable zero-argument factory such as a class or a
``functools.partial``; not a lambda) and rebuilds it from those bytes after every simulator error, so a crash
never leaks a half-broken simulator into the next episode. A simulator exception comes back as an error
string (the episode is recorded as crashed, exactly like :func:`~vitavla.rollout.runner.run_episode` does);
a worker that dies (segfault, OOM kill) or, with ``timeout``, hangs is detected, restarted and its episode
recorded as crashed. Nothing a simulator does can kill or hang the pool.

Waves, not per-slot refills: a :class:`~vitavla.streaming.StreamingPolicy` batch shares one timeline (token
order, cache length, window refills), so all of its rows must start together. :func:`run_wave` therefore
starts N episodes at once and drops finished ones from the policy batch with ``select(rows)``; the next wave
starts when all are done. The cost is idle simulators while the longest episode of a wave finishes (small
when most episodes run to ``max_steps``, as failures do); per-slot refills would need one policy batch per
slot, i.e. no batched policy calls at all.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from vitavla.action_head import ActionOutput
from vitavla.normalizer import Normalizer
from vitavla.observation import Observation
from vitavla.policy_protocol import RolloutPolicy, check_rollout_policy
from vitavla.rollout.env import RolloutEnv
from vitavla.rollout.env_worker import worker_main
from vitavla.rollout.episode import EpisodeResult, EpisodeSpec, to_observation
from vitavla.rollout.executors import ActionExecutor, to_env_action

# Thread caps for worker processes, set in the environment before they start so that libraries initialised
# at import (OpenMP, MKL, OpenBLAS) see them: N simulators with a thread pool each would oversubscribe cores.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class EnvPoolError(RuntimeError):
    """A worker could not build its env at all (import error, bad pickle): a setup bug, not a sim crash."""


class Reply(NamedTuple):
    """A worker's answer: ``ok`` and the value, or not ``ok`` and an error string; seconds spent in the env."""

    ok: bool
    value: Any
    seconds: float


def _payload(env: RolloutEnv | Callable[[], RolloutEnv]) -> bytes:
    try:
        return pickle.dumps(env)
    except Exception as e:
        what = type(env).__name__ if isinstance(env, RolloutEnv) else repr(env)
        raise TypeError(
            f"EnvPool env must pickle to reach its worker processes, but {what} does not ({type(e).__name__}: "
            f"{e}); pass a picklable factory (a class or functools.partial, not a lambda), or give the env a "
            "__getstate__ that drops live simulator handles (they are rebuilt lazily on reset)") from e


@contextmanager
def _thread_env():
    old = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class _Slot:
    process: Any
    conn: Any
    ready: bool = False


class EnvPool:
    """N worker processes with one :class:`RolloutEnv` each; use as a context manager (closes on exit).

    Args:
        env: an env instance (pickled as is; its simulator must be created lazily, on first reset) or a
            picklable zero-argument factory returning one.
        num_workers: worker processes (one simulator each).
        timeout: seconds a worker may take for one command before it counts as hung: it is killed,
            restarted, and the episode recorded as crashed (None: wait as long as the worker is alive).
        start_timeout: seconds a worker may take to start (imports) and build its env.
    """

    def __init__(self, env: RolloutEnv | Callable[[], RolloutEnv], num_workers: int, *,
                 timeout: float | None = None, start_timeout: float = 600.0):
        if num_workers < 1:
            raise ValueError(f"EnvPool num_workers must be >= 1, got {num_workers}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"EnvPool timeout must be positive or None, got {timeout}")
        self._payload = _payload(env)
        self._ctx = mp.get_context("spawn")
        self.timeout, self.start_timeout = timeout, start_timeout
        self.restarts = 0
        self._slots: list[_Slot | None] = [None] * num_workers
        self.num_tasks = self.max_steps = self.action_dim = None
        try:
            for i in range(num_workers):
                self._start(i)
            for i in range(num_workers):
                self._await_ready(i)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def closed(self) -> bool:
        return all(slot is None for slot in self._slots)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- processes -------------------------------------------------------------------------------------
    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        with _thread_env():
            proc = self._ctx.Process(target=worker_main, args=(child, self._payload), daemon=True,
                                     name=f"vitavla-env-{i}")
            proc.start()
        child.close()  # the parent keeps only its end, so a dead worker shows up as EOF
        self._slots[i] = _Slot(proc, parent)

    def _await_ready(self, i: int) -> None:
        slot = self._slots[i]
        deadline = time.monotonic() + self.start_timeout
        while not slot.ready:
            if not slot.conn.poll(0.1):
                if not slot.process.is_alive() and not slot.conn.poll():
                    raise EnvPoolError(f"env worker {i} exited with code {slot.process.exitcode} while "
                                       "starting")
                if time.monotonic() > deadline:
                    raise EnvPoolError(f"env worker {i} did not start within start_timeout="
                                       f"{self.start_timeout} s")
                continue
            try:
                msg = slot.conn.recv()
            except (EOFError, OSError):  # it died before reporting (e.g. a script without a __main__ guard)
                slot.process.join(1.0)
                raise EnvPoolError(f"env worker {i} exited with code {slot.process.exitcode} while starting; "
                                   "a script that starts simulator workers must do so under "
                                   "`if __name__ == '__main__':` (they are spawned)") from None
            self._take_ready(i, msg)

    def _take_ready(self, i: int, msg) -> None:
        kind, value = msg
        if kind == "fatal":
            raise EnvPoolError(f"env worker {i} could not build its env:\n{value}")
        if kind != "ready":
            raise EnvPoolError(f"env worker {i} sent {kind!r} before it was ready")
        self.num_tasks, self.max_steps, self.action_dim = value
        self._slots[i].ready = True

    def _stop(self, indices: list[int], wait: float) -> None:
        slots = [(i, self._slots[i]) for i in indices if self._slots[i] is not None]
        for i, slot in slots:  # ask every worker first, so they all shut down at the same time
            self._slots[i] = None
            try:
                if slot.process.is_alive():
                    slot.conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + wait
        for _, slot in slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(2.0)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()

    def restart(self, i: int) -> None:
        """Replace worker ``i`` by a fresh process (it builds its env from the original bytes)."""
        self._stop([i], wait=0.0)
        self._start(i)
        self.restarts += 1

    def close(self) -> None:
        """Stop every worker: ask politely, then terminate, then kill; safe to call twice."""
        self._stop(list(range(len(self._slots))), wait=5.0)

    # -- commands --------------------------------------------------------------------------------------
    def submit(self, i: int, cmd: str, arg=None) -> None:
        """Send a command to worker ``i`` without waiting; collect its answer with :meth:`result`."""
        slot = self._slots[i]
        if slot is None:
            raise RuntimeError("EnvPool is closed")
        try:
            slot.conn.send((cmd, arg))
        except (BrokenPipeError, OSError):
            pass  # the worker is dead: result() notices and reports it

    def result(self, i: int, what: str = "command") -> Reply:
        """The answer of worker ``i`` to its last command; a dead or hung worker is restarted and its
        answer is an error (``ok`` False), like a simulator crash."""
        slot = self._slots[i]
        start = time.monotonic()
        while True:
            try:
                msg = slot.conn.recv() if slot.conn.poll(0.1) else None
                dead = False
            except (EOFError, OSError):  # the worker's end closed: it died, maybe mid-answer
                msg, dead = None, True
            if msg is not None:
                if msg[0] in ("ready", "fatal"):  # a restarted worker reports in before answering
                    self._take_ready(i, msg)
                    start = time.monotonic()
                    continue
                kind, value, seconds = msg
                return Reply(kind == "ok", value, seconds)
            if not dead and slot.process.is_alive():
                limit = self.timeout if slot.ready else self.start_timeout
                if limit is None or time.monotonic() - start <= limit:
                    continue
                seconds = time.monotonic() - start
                self.restart(i)
                return Reply(False, f"TimeoutError: env worker {i} did not answer {what} within {limit} s",
                             seconds)
            if not dead and slot.conn.poll(0):
                continue  # it answered just before exiting
            slot.process.join(1.0)
            code, seconds = slot.process.exitcode, time.monotonic() - start
            self.restart(i)
            return Reply(False, f"WorkerDied: env worker {i} exited with code {code} during {what}", seconds)

    def run(self, commands: dict[int, tuple[str, Any]]) -> dict[int, Reply]:
        """Send every command first (the workers run in parallel), then collect the answers."""
        for i, (cmd, arg) in commands.items():
            self.submit(i, cmd, arg)
        return {i: self.result(i, cmd) for i, (cmd, _) in commands.items()}

    def task_name(self, task_index: int) -> str:
        """A task's name, asked of worker 0 (raises the worker's error message on failure)."""
        reply = self.run({0: ("task_name", task_index)})[0]
        if not reply.ok:
            raise RuntimeError(reply.value)
        return reply.value


# Pools kept alive by an open `shared_pools()` block, keyed by (env bytes, workers, timeout); None: no block.
_shared: dict[tuple, EnvPool] | None = None


@contextmanager
def shared_pools():
    """Within this block, :func:`acquire_pool` hands out one pool per (env, size, timeout) and
    :func:`release_pool` keeps it running; every pool closes when the block ends.

    For a process that evaluates several policies on the same simulator (``vitavla quickstart`` rolls out four):
    worker start and env creation (~20 s for LIBERO) are paid once. Episodes stay independent, since every
    episode starts with a reset from its own init state and seed, exactly as in a fresh pool.
    """
    global _shared
    if _shared is not None:  # nested: the outer block owns the pools
        yield
        return
    _shared = {}
    try:
        yield
    finally:
        pools, _shared = list(_shared.values()), None
        for pool in pools:
            pool.close()


def acquire_pool(env: RolloutEnv | Callable[[], RolloutEnv], num_workers: int, *,
                 timeout: float | None = None) -> EnvPool:
    """A running pool for ``env``: the shared one inside :func:`shared_pools`, else a new one."""
    if _shared is None:
        return EnvPool(env, num_workers, timeout=timeout)
    key = (_payload(env), num_workers, timeout)
    pool = _shared.get(key)
    if pool is None or pool.closed:
        pool = _shared[key] = EnvPool(env, num_workers, timeout=timeout)
    return pool


def release_pool(pool: EnvPool, *, broken: bool = False) -> None:
    """Done with ``pool``: close it, unless a :func:`shared_pools` block keeps it for the next user.

    ``broken``: the user stopped mid-command (an exception), so a worker may still owe an answer that the
    next user would read as its own; such a pool is closed and dropped from the block.
    """
    if _shared is not None:
        for key, shared in list(_shared.items()):
            if shared is pool:
                if not broken:
                    return
                del _shared[key]
    pool.close()


@dataclass
class WaveRows:
    """Per-episode state of a wave, indexed like its specs: what :func:`lockstep` reads and updates.

    ``frames`` (recorded rows only): :attr:`Obs.frame` after the reset and after every step since;
    ``first_last``: the first frame and the latest one; ``steps`` and ``success``: of the current
    :func:`lockstep` call (a CALVIN chain resets them per subtask); ``sim`` / ``pol``: seconds so far.
    """

    obs: list
    executors: list
    frames: list
    first_last: list
    sim: list
    pol: list
    steps: list
    success: list
    errors: list

    @classmethod
    def new(cls, n: int, record: Sequence[bool]) -> WaveRows:
        return cls([None] * n, [None] * n, [[] if on else None for on in record], [None] * n, [0.0] * n,
                   [0.0] * n, [0] * n, [False] * n, [None] * n)

    def take_reset(self, replies: dict[int, Reply]) -> list[int]:
        """Store the reset (or new-subtask) observations of ``replies``; returns the rows that can go on."""
        ok = []
        for k, r in sorted(replies.items()):
            self.sim[k] += r.seconds
            if not r.ok:
                self.errors[k] = r.value
                continue
            self.obs[k] = r.value
            ok.append(k)
            if self.first_last[k] is None:  # the episode's first frame
                self.first_last[k] = [r.value.frame.copy()] * 2
                if self.frames[k] is not None:
                    self.frames[k].append(self.first_last[k][0])
        return ok


def lockstep(pool: EnvPool, policy: RolloutPolicy, rows: WaveRows, active: list[int], max_steps: int,
             normalizer: Normalizer | None = None, image_size: int = 224) -> list[int]:
    """Step rows ``active`` together for up to ``max_steps`` control steps: each step sends every running
    row's action (the simulators step in parallel) and makes ONE policy call on the batch of running rows,
    whose instructions come from their observations. A row stops when its env reports done or success, or
    crashes (``errors``; it leaves the batch via ``policy.select``); ``rows.executors`` must be fresh and the
    policy reset. Returns the rows still running after ``max_steps`` (they failed by time-out)."""
    in_policy: list[int] | None = None  # row index of each row of the policy's batch
    for t in range(max_steps):
        if not active:
            break
        start = time.perf_counter()
        need = [rows.executors[k].needs_query(t) for k in active]
        if any(need):
            if not all(need):
                raise RuntimeError(f"executors disagree on querying the policy at step {t}; batched "
                                   "episodes must use executors that query at the same steps")
            if in_policy is not None and in_policy != active:
                policy.select([in_policy.index(k) for k in active])
            obs = [to_observation(rows.obs[k], image_size, normalizer=normalizer) for k in active]
            batch = Observation(torch.cat([o.images for o in obs]), torch.cat([o.state for o in obs]),
                                [s for o in obs for s in o.instruction])
            prep = time.perf_counter()
            out = policy.step(batch)
            shared = (time.perf_counter() - prep) / len(active)
            in_policy = list(active)
            for row, k in enumerate(active):
                rows.pol[k] += shared + (prep - start) / len(active)  # the batch's building is shared too
                rows.executors[k].update(t, ActionOutput(out.arm[row:row + 1], out.gripper_logit[row:row + 1]))
        commands = {}
        for k in active:
            a0 = time.perf_counter()
            commands[k] = ("step", to_env_action(rows.executors[k].act(t), normalizer)[0])
            rows.pol[k] += time.perf_counter() - a0
        still = []
        for k, r in pool.run(commands).items():
            rows.sim[k] += r.seconds
            if not r.ok:
                rows.errors[k], rows.success[k] = r.value, False
                continue
            rows.obs[k], done, rows.success[k] = r.value
            rows.steps[k] = t + 1
            rows.first_last[k][1] = rows.obs[k].frame.copy()
            if rows.frames[k] is not None:
                rows.frames[k].append(rows.first_last[k][1])
            if not (done or rows.success[k]):
                still.append(k)
        active = still
    return active


def run_wave(pool: EnvPool, policy: RolloutPolicy, specs: Sequence[EpisodeSpec],
             executor_factory: Callable[[], ActionExecutor], normalizer: Normalizer | None = None,
             image_size: int = 224, settle_steps: int = 0, record_frames: bool | Sequence[bool] = False,
             settle_action: np.ndarray | None = None) -> list[EpisodeResult]:
    """Run ``specs`` (at most ``pool.size``) concurrently, spec ``k`` on worker ``k``; results in spec order.

    Per episode this is :func:`~vitavla.rollout.runner.run_episode`: reset and ``settle_steps`` no-op actions
    (in the worker), then up to ``pool.max_steps`` policy steps (:func:`lockstep`), each with its own
    executor; the results (success, steps, error, frames) equal run_episode's for deterministic envs and
    policies. Differences:

    * Seeding: each worker seeds numpy/torch with its spec's seed before reset (the simulator side, as
      run_episode). The policy is shared, so the main process seeds torch/numpy once per wave, with the
      first spec's seed; a stochastic policy therefore draws differently than in sequential runs.
    * ``seconds_sim`` is measured inside the worker (env calls only, not the pipe transfer);
      ``seconds_policy`` is each episode's own observation/executor work plus an equal share of every
      batched policy call it took part in.
    * A crashed episode (simulator error, dead or hung worker) leaves the batch via ``policy.select``; its
      worker rebuilds its env. Policy exceptions propagate.
    """
    n = check_wave(pool, policy, len(specs))
    frames_on = record_flags(record_frames, n)
    torch.manual_seed(specs[0].seed)
    np.random.seed(specs[0].seed % 2**32)
    noop = np.zeros(pool.action_dim, dtype=np.float32) if settle_action is None else np.asarray(settle_action)
    policy.reset()
    rows = WaveRows.new(n, frames_on)
    rows.executors = [executor_factory() for _ in range(n)]
    for ex in rows.executors:
        ex.reset()
    active = rows.take_reset(pool.run({k: ("reset", (s.task_index, s.episode_index, s.seed, settle_steps, noop, on))
                                       for k, (s, on) in enumerate(zip(specs, frames_on))}))
    instructions = [None if o is None else o.instruction for o in rows.obs]
    lockstep(pool, policy, rows, active, pool.max_steps, normalizer, image_size)
    return [EpisodeResult(s.task_index, s.episode_index, bool(rows.success[k]) and rows.errors[k] is None,
                          rows.steps[k], rows.errors[k], rows.frames[k], rows.sim[k], rows.pol[k], instructions[k],
                          rows.first_last[k])
            for k, s in enumerate(specs)]


def check_wave(pool: EnvPool, policy, n: int) -> int:
    """``n`` if a wave of ``n`` episodes fits ``pool`` and ``policy`` is a rollout policy that can drop rows
    (:func:`~vitavla.policy_protocol.check_rollout_policy`), else a ValueError/TypeError."""
    if not 1 <= n <= pool.size:
        raise ValueError(f"a wave needs 1 to pool.size={pool.size} episodes, got {n}")
    check_rollout_policy(policy, batched=n > 1)
    return n


def record_flags(record_frames: bool | Sequence[bool], n: int) -> list[bool]:
    """One record-frames flag per episode of a wave."""
    flags = [record_frames] * n if isinstance(record_frames, bool) else list(record_frames)
    if len(flags) != n:
        raise ValueError(f"record_frames has {len(flags)} entries for {n} specs")
    return flags


def default_workers(requested: int | None = None) -> int:
    """``requested`` or, if None, the CPU cores this process may use (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_envs must be >= 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


__all__ = ["EnvPool", "EnvPoolError", "Reply", "WaveRows", "acquire_pool", "check_wave",
           "default_workers", "lockstep", "record_flags", "release_pool", "run_wave", "shared_pools"]
