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
from vitavla.rollout.env import RolloutEnv, close_quietly


def is_chain_env(obj) -> bool:
    """A CALVIN-style env (:class:`~vitavla.rollout.calvin_protocol.CalvinEnv` with its task ``oracle``):
    reset from a chain's initial state, stepped subtask by subtask."""
    return all(callable(getattr(obj, name, None)) for name in ("reset", "step", "get_info", "oracle"))


def _build(payload: bytes):
    obj = pickle.loads(payload)
    env = obj if isinstance(obj, RolloutEnv) or is_chain_env(obj) else obj()
    if not (isinstance(env, RolloutEnv) or is_chain_env(env)):
        raise TypeError(f"EnvPool env factory returned {type(env).__name__}, expected a RolloutEnv or a CALVIN "
                        "env (reset, step, get_info, oracle)")
    return env


class _Chain:
    """A worker's CALVIN chain in progress: the current subtask, its instruction, the env info at its start
    (what the oracle compares against) and the latest observation. The oracle runs here, next to the
    simulator, so its info dicts never cross the pipe."""

    def __init__(self):
        self.subtask = self.instruction = self.start = self.obs = None

    def handle(self, env, cmd: str, arg):
        if cmd == "chain_reset":  # (initial_state, seed)
            initial_state, seed = arg
            _seed(seed)
            self.subtask = self.start = None
            self.obs = env.reset(initial_state)
            return self.obs
        if cmd == "subtask":  # (subtask, instruction): the latest observation, now with that instruction
            self.subtask, self.instruction = arg
            self.start = env.get_info()
            self.obs.instruction = self.instruction
            return self.obs
        if cmd == "step":
            if self.subtask is None:
                raise RuntimeError("EnvPool chain step before a subtask was set")
            self.obs, info = env.step(arg)
            self.obs.instruction = self.instruction
            return self.obs, False, bool(env.oracle(self.start, info, self.subtask))
        raise ValueError(f"unknown EnvPool command {cmd!r} for a CALVIN env")


def _seed(seed: int) -> None:
    # As run_episode does, for simulators that draw from the global RNGs during reset/step. torch is seeded
    # only when the env loaded it: an env that never imported torch cannot draw from its generator.
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _handle(env, cmd: str, arg, chain: _Chain):
    if not isinstance(env, RolloutEnv):
        return chain.handle(env, cmd, arg)
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


def worker_main(conn, payload: bytes) -> None:
    """Worker main loop: build the env, then answer commands until ``close`` or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    route_from_env()  # third-party output into the parent's log file, as in the parent
    try:
        env = _build(payload)
        info = (env.num_tasks, getattr(env, "max_steps", None), env.action_dim)
        chain = _Chain()
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
            reply = ("ok", _handle(env, cmd, arg, chain), time.perf_counter() - start)
        except Exception as e:  # any simulator failure: physics blow-up, renderer error, adapter bug
            reply = ("error", f"{type(e).__name__}: {e}", time.perf_counter() - start)
            close_quietly(env)
            env, chain = None, _Chain()
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    close_quietly(env)
    conn.close()
    # Skip interpreter teardown (seconds with torch loaded); the env is closed and nothing else is pending.
    os._exit(0)
