"""Closed-loop evaluation: run episodes of a :class:`RolloutEnv` with a streaming policy, resumably.

:func:`run_episode` runs one episode; :func:`evaluate` runs a list of :class:`EpisodeSpec`, appending each
finished attempt to a JSON-lines file (flushed and fsync'd) so that a killed evaluation restarts where it
stopped and ends with the same totals (:mod:`vitavla.rollout.ledger`, the one resume-and-retry mechanism).
Simulator crashes are recorded, retried, and reported apart from successes and failures; a policy exception
is a bug and propagates. Totals go through :class:`~vitavla.rollout.counts.EpisodeCounts` so that, with one
results file per rank (see :func:`shard`), they sum across processes when ``torch.distributed`` is
initialized.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vitavla.normalizer import Normalizer
from vitavla.policy_protocol import RolloutPolicy, as_rollout_policy
from vitavla.rollout.env import Obs, RolloutEnv, close_quietly
# EpisodeSpec, EpisodeResult and to_observation live in episode.py (parallel.py needs them too, and runner.py
# needs parallel.py); they are re-exported here, where callers have always imported them from.
from vitavla.rollout.episode import EnvError, EpisodeResult, EpisodeSpec, sim_call, to_observation
from vitavla.rollout.executors import ActionExecutor, to_env_action
from vitavla.rollout.counts import summarize
from vitavla.rollout.ledger import Ledger, run_attempts
from vitavla.rollout.parallel import EnvPool, run_wave
from vitavla.rollout.records import load_results, result_record  # noqa: F401 (load_results: re-exported)


class Controller:
    """Policy + executor + normalizer: observation in, raw env action out; times the policy side."""

    def __init__(self, policy: RolloutPolicy, executor: ActionExecutor, normalizer: Normalizer | None = None,
                 image_size: int = 224):
        self.policy, self.executor = policy, executor
        self.normalizer, self.image_size = normalizer, image_size
        self.seconds = 0.0
        self.queries = 0

    def reset(self) -> None:
        self.policy.reset()
        self.executor.reset()

    def act(self, t: int, obs: Obs, instruction: str | None = None) -> np.ndarray:
        start = time.perf_counter()
        if self.executor.needs_query(t):
            self.executor.update(t, self.policy.step(to_observation(obs, self.image_size, instruction,
                                                                    self.normalizer)))
            self.queries += 1
        action = to_env_action(self.executor.act(t), self.normalizer)[0]
        self.seconds += time.perf_counter() - start
        return action


def run_episode(env: RolloutEnv, streaming_policy: RolloutPolicy, executor: ActionExecutor, spec: EpisodeSpec,
                normalizer: Normalizer | None = None, image_size: int = 224, settle_steps: int = 0,
                record_frames: bool = False, settle_action: np.ndarray | None = None,
                controller: Controller | None = None) -> EpisodeResult:
    """One episode: reset, ``settle_steps`` no-op actions (LIBERO: 5 zeros for Seer, 10 for OpenVLA), then
    up to ``env.max_steps`` policy steps, stopping at ``done``. Seeds torch and numpy with ``spec.seed``.

    ``record_frames``: keep every frame for a video; the env is told first (``set_recording``) so that it
    renders its video camera for this episode only. ``controller``: anything with ``reset()``,
    ``act(t, obs, instruction)`` and ``seconds`` instead of the in-process :class:`Controller` (e.g. a policy
    server's client, :class:`vitavla.serving.sim_client.RemoteController`); ``streaming_policy``,
    ``executor``, ``normalizer`` and ``image_size`` are then unused."""
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    ctl = controller or Controller(streaming_policy, executor, normalizer, image_size)
    ctl.reset()
    set_recording(env, record_frames)
    frames = [] if record_frames else None
    first_last, instruction = None, None
    sim, steps, success = 0.0, 0, False
    noop = np.zeros(env.action_dim, dtype=np.float32) if settle_action is None else settle_action

    def timed(fn, *args):
        nonlocal sim
        start = time.perf_counter()
        try:
            return sim_call(fn, *args)
        finally:
            sim += time.perf_counter() - start

    try:
        obs = timed(env.reset, spec.task_index, spec.episode_index, spec.seed)
        for _ in range(settle_steps):
            obs = timed(env.step, noop)[0]
        first_last, instruction = [obs.frame.copy()] * 2, obs.instruction
        for t in range(env.max_steps):
            if frames is not None:
                frames.append(first_last[1] if t == 0 else obs.frame.copy())
            obs, done, success, _ = timed(env.step, ctl.act(t, obs))
            steps = t + 1
            first_last[1] = obs.frame.copy()
            if done or success:
                break
        if frames is not None:
            frames.append(first_last[1])  # the outcome: the state after the last action
        error = None
    except EnvError as e:
        error, success = str(e), False
    return EpisodeResult(spec.task_index, spec.episode_index, bool(success), steps, error, frames, sim,
                         ctl.seconds, instruction, first_last)


def set_recording(env, on: bool) -> None:
    """Tell ``env`` whether the coming episode is recorded (see :meth:`RolloutEnv.set_recording`); envs
    written against the contract before it existed simply lack the method."""
    hook = getattr(env, "set_recording", None)
    if callable(hook):
        hook(bool(on))


def shard(specs: list[EpisodeSpec], rank: int, world_size: int) -> list[EpisodeSpec]:
    """Round-robin split: rank r gets specs r, r + W, ... (deterministic, covers every spec exactly once)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(specs[rank::world_size])


def episode_record(spec: EpisodeSpec, res: EpisodeResult, names: list[str], attempt: int) -> dict:
    """The JSON line of one episode attempt (``attempt`` counts earlier ones, earlier runs included)."""
    rec = result_record(res)
    rec.update(seed=spec.seed, task_name=names[spec.task_index], attempt=attempt)
    return rec


def evaluate(env_factory: Callable[[], RolloutEnv], policy, specs: list[EpisodeSpec],
             executor_factory: Callable[[], ActionExecutor], results_path: str, retries: int = 1, *,
             normalizer: Normalizer | None = None, image_size: int = 224, settle_steps: int = 0,
             settle_action: np.ndarray | None = None, progress: bool = True, num_envs: int = 1,
             env_timeout: float | None = None) -> dict:
    """Run every spec not yet finished in ``results_path`` and summarize all of ``specs``.

    Resume and retries follow :class:`~vitavla.rollout.ledger.Ledger`: a spec is finished when it has an
    error-free record or ``1 + retries`` error records from this run (a rerun retries specs that only
    crashed before). After every simulator crash the env is closed and rebuilt with ``env_factory`` (its
    state is not trusted). Returns :func:`~vitavla.rollout.counts.summarize` of the final records:
    ``{"success_rate", "success_ci95", "successes", "episodes", "errors", "per_task": {task: ...}}``;
    ``episodes`` counts error-free episodes only, so crashes never enter a success rate.

    ``num_envs > 1`` runs up to that many episodes at once, each simulator in its own process, with one
    batched policy call per step (:mod:`vitavla.rollout.parallel`; the policy needs ``select(rows)``). The
    env goes to the workers pickled: ``env_factory`` itself if it pickles (a class, ``functools.partial``),
    else one env it built. A crashed episode is retried in a later wave (its worker rebuilds its env);
    records may then be appended in another order than sequentially, with the same totals. ``env_timeout``:
    seconds a parallel simulator may take for one reset/step before it counts as hung (killed, restarted,
    recorded as a crash).
    """
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if num_envs < 1:
        raise ValueError(f"evaluate num_envs must be >= 1, got {num_envs}")
    ledger = Ledger(path, retries)
    # Checked before any simulator starts; a batch of several episodes needs select(rows).
    policy = as_rollout_policy(policy, batched=num_envs > 1)
    env = env_factory()
    names = [env.task_name(i) for i in range(env.num_tasks)]
    pending = [s for s in specs if not ledger.finished(s.key)]
    done = [ledger.final(s.key) for s in specs if ledger.finished(s.key)]
    wins, ran = sum(r["success"] for r in done), len(done)
    bar = tqdm(total=len(specs), initial=ran, desc="episodes", disable=not progress, dynamic_ncols=True)

    def finished(spec: EpisodeSpec, final: dict) -> None:
        nonlocal ran, wins
        ran, wins = ran + 1, wins + final["success"]
        bar.update(1)
        bar.set_postfix(success=f"{wins / ran:.3f}")

    def one(wave: list[EpisodeSpec]) -> list[tuple[dict, EpisodeResult]]:
        nonlocal env
        (spec,) = wave
        res = run_episode(env, policy, executor_factory(), spec, normalizer, image_size, settle_steps,
                          settle_action=settle_action)
        if res.error is not None:  # rebuilt after every crash: no episode runs on a crashed simulator
            close_quietly(env)
            env = env_factory()
        return [(episode_record(spec, res, names, ledger.attempts(spec.key)), res)]

    run = dict(normalizer=normalizer, image_size=image_size, settle_steps=settle_steps,
               settle_action=settle_action)
    try:
        if num_envs > 1 and pending:
            with EnvPool(_picklable_source(env_factory, env), min(num_envs, len(pending)),
                         timeout=env_timeout) as pool:
                def wave_on_pool(wave: list[EpisodeSpec]) -> list[tuple[dict, EpisodeResult]]:
                    results = run_wave(pool, policy, wave, executor_factory, **run)
                    return [(episode_record(s, r, names, ledger.attempts(s.key)), r) for s, r in zip(wave, results)]

                finals = run_attempts(specs, ledger, wave_on_pool, wave_size=pool.size, on_finished=finished)
        else:
            finals = run_attempts(specs, ledger, one, on_finished=finished)
    finally:
        bar.close()
        env.close()
    return summarize(finals, names)


def _picklable_source(env_factory, env: RolloutEnv):
    """What an :class:`EnvPool` ships to its workers: ``env_factory`` when it pickles (a class,
    ``functools.partial``), else the env it built (a lambda or closure; simulators start lazily)."""
    try:
        pickle.dumps(env_factory)
        return env_factory
    except Exception:
        return env


