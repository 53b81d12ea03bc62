"""The simulator side of :class:`~vitavla.rollout.parallel.EnvPool`: what runs in each worker process.

Kept apart from the pool, with only numpy and the env contract imported, because a spawned worker imports
the module of its target function before it builds its env: importing the pool's module (runner, policy,
torchmetrics) would add seconds to every worker start. Thread caps come from the environment variables the
pool sets before it spawns.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback

import numpy as np

from vitavla.console import route_from_env
from vitavla.rollout.env import RolloutEnv


def _build(payload: bytes) -> RolloutEnv:
    obj = pickle.loads(payload)
    env = obj if isinstance(obj, RolloutEnv) else obj()
    if not isinstance(env, RolloutEnv):
        raise TypeError(f"EnvPool env factory returned {type(env).__name__}, expected a RolloutEnv")
    return env


def _seed(seed: int) -> None:
    # As run_episode does, for simulators that draw from the global RNGs during reset/step. torch is seeded
    # only when the env loaded it: an env that never imported torch cannot draw from its generator.
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _handle(env: RolloutEnv, cmd: str, arg):
    if cmd == "reset":
        task, episode, seed, settle_steps, settle_action, record = arg
        _seed(seed)
        hook = getattr(env, "set_recording", None)  # as runner.set_recording (not imported: lean worker)
        if callable(hook):
            hook(bool(record))
        obs = env.reset(task, episode, seed)
        for _ in range(settle_steps):
            obs = env.step(settle_action)[0]
        return obs
    if cmd == "step":
        obs, done, success, _ = env.step(arg)  # info is dropped: the runner never reads it, it may not pickle
        return obs, bool(done), bool(success)
    if cmd == "task_name":
        return env.task_name(arg)
    raise ValueError(f"unknown EnvPool command {cmd!r}")


def _close_quietly(env: RolloutEnv | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # a crashed simulator may fail to close; it is dropped either way
        pass


def worker_main(conn, payload: bytes) -> None:
    """Worker main loop: build the env, then answer commands until ``close`` or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    route_from_env()  # third-party output into the parent's log file, as in the parent
    try:
        env = _build(payload)
        info = (env.num_tasks, env.max_steps, env.action_dim)
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", info))
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):  # parent gone
            break
        if cmd == "close":
            break
        start = time.perf_counter()
        try:
            if env is None:  # rebuilt lazily after a crash: its state is not trusted
                env = _build(payload)
            reply = ("ok", _handle(env, cmd, arg), time.perf_counter() - start)
        except Exception as e:  # any simulator failure: physics blow-up, renderer error, adapter bug
            reply = ("error", f"{type(e).__name__}: {e}", time.perf_counter() - start)
            _close_quietly(env)
            env = None
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    _close_quietly(env)
    conn.close()
    # Skip interpreter teardown (seconds with torch loaded); the env is closed and nothing else is pending.
    os._exit(0)
