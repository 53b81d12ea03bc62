"""CALVIN long-horizon evaluation logic, simulator-free (the protocol of Mees et al., 2022, as Seer runs it).

Mirrors ``calvin_agent/evaluation/evaluate_policy.py``: every chain starts from its initial scene state
(the env is reset once per chain, never between subtasks), every subtask resets the policy, uses the
subtask's instruction, runs up to ``ep_len = 360`` steps and succeeds as soon as the task oracle reports
it after a step; the chain stops at its first failed subtask. A calvin_env adapter implements
:class:`CalvinEnv`; the oracle is any ``(start_info, current_info, subtask) -> bool``, e.g.
:func:`calvin_oracle` around ``calvin_env.envs.tasks.Tasks``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from vitavla.normalizer import Normalizer
from vitavla.policy_protocol import RolloutPolicy, as_rollout_policy
from vitavla.rollout.env import Obs, close_quietly
from vitavla.rollout.episode import EnvError, EpisodeSpec, sim_call
from vitavla.rollout.executors import ActionExecutor, FirstActionExecutor
from vitavla.rollout.ledger import Ledger, run_attempts
from vitavla.rollout.runner import Controller

log = logging.getLogger(__name__)

NUM_SUBTASKS = 5
EP_LEN = 360

Oracle = Callable[[dict, dict, str], bool]


class CalvinEnv(Protocol):
    """What :func:`run_chain` needs from a CALVIN env adapter."""

    def reset(self, initial_state: Any) -> Obs:
        """Put robot and scene in ``initial_state`` (the adapter maps it to robot_obs / scene_obs)."""

    def step(self, action: np.ndarray) -> tuple[Obs, dict]:
        """Apply one raw action (CALVIN rel_actions, 6 values in [-1, 1] + gripper); returns (obs, info)."""

    def get_info(self) -> dict:
        """The env info the oracle compares against (``env.get_info()``)."""


@dataclass
class Chain:
    initial_state: Any
    subtasks: list[str]

    def __post_init__(self) -> None:
        if len(self.subtasks) != NUM_SUBTASKS:
            raise ValueError(f"a CALVIN chain has {NUM_SUBTASKS} subtasks, got {len(self.subtasks)}")


@dataclass
class ChainResult:
    subtasks: list[str]
    completed: int
    """Subtasks done in a row before the first failure (0..5): the number ``count_success`` reads."""
    steps: list[int] = field(default_factory=list)
    """Steps used by each attempted subtask (the failed one included)."""
    seconds_sim: float = 0.0
    """Time spent in the simulator (resets, steps, oracle)."""
    seconds_policy: float = 0.0
    """Time spent in the policy (queries and executor), for throughput reports."""
    instructions: list[str] = field(default_factory=list)
    """The instruction of each attempted subtask."""
    frames: list | None = None
    """Recorded chains only: :attr:`Obs.frame` after the reset and after every step (all subtasks)."""
    first_last: list | None = None
    """The first frame and the last one (every chain that reset), for the evaluation's contact sheet."""


def load_chains(source: str | Path | list) -> list[Chain]:
    """Chains from an official ``eval_sequences.json``: a path, or the loaded list of
    ``[initial_state, [5 subtasks]]``.

    The official 1000 chains come from ``get_sequences(1000)`` under seed 0, a sampler with scene-dependent
    task preconditions; GR-1, RoboFlamingo and Seer all evaluate on the frozen dump, so use that file rather
    than re-sampling.
    """
    items = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    chains = []
    for i, item in enumerate(items):
        if isinstance(item, Chain):
            chains.append(item)
            continue
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ValueError(f"chain {i}: expected [initial_state, [subtasks]], got {item!r:.80}")
        chains.append(Chain(item[0], list(item[1])))
    return chains


def calvin_oracle(task_oracle) -> Oracle:
    """Adapt ``calvin_env.envs.tasks.Tasks`` to the ``(start_info, current_info, subtask) -> bool`` form."""
    def oracle(start: dict, current: dict, subtask: str) -> bool:
        return len(task_oracle.get_task_info_for_set(start, current, {subtask})) > 0

    return oracle


def run_chain(env: CalvinEnv, policy: RolloutPolicy, chain: Chain, oracle: Oracle,
              instructions: Mapping[str, str] | Callable[[str], str], ep_len: int = EP_LEN,
              executor: ActionExecutor | None = None, normalizer: Normalizer | None = None,
              image_size: int = 224, record_frames: bool = False, result: ChainResult | None = None) -> ChainResult:
    """Roll out one chain. ``instructions`` maps a subtask to its text (official: ``val_annotations[t][0]``).

    The default executor is Seer's: the first action of each predicted chunk, gripper thresholded.
    ``result``: filled in place as the chain runs (so a caller keeps the frames of a chain cut short by a
    simulator crash); a new one by default.
    """
    if ep_len < 1:
        raise ValueError(f"ep_len must be >= 1, got {ep_len}")
    ctl = Controller(as_rollout_policy(policy), executor or FirstActionExecutor(), normalizer, image_size)
    text = instructions if callable(instructions) else instructions.__getitem__
    obs = env.reset(chain.initial_state)
    result = result if result is not None else ChainResult(list(chain.subtasks), 0)
    result.first_last = [obs.frame.copy()] * 2
    result.frames = [result.first_last[0]] if record_frames else None
    for subtask in chain.subtasks:
        ctl.reset()  # model.reset(): no history carries over from the previous subtask
        start_info = env.get_info()
        instruction = text(subtask)
        result.instructions.append(instruction)
        done = False
        for t in range(ep_len):
            obs, info = env.step(ctl.act(t, obs, instruction))
            result.first_last[1] = obs.frame.copy()
            if result.frames is not None:
                result.frames.append(result.first_last[1])
            if oracle(start_info, info, subtask):
                done = True
                break
        result.steps.append(t + 1)
        if not done:
            break
        result.completed += 1
    result.seconds_policy = ctl.seconds
    return result


def count_success(results: list[ChainResult | int]) -> list[float]:
    """[sr_1, ..., sr_5]: fraction of chains with at least k subtasks done in a row (CALVIN's definition)."""
    if not results:
        raise ValueError("count_success needs at least one chain result")
    n = Counter(r.completed if isinstance(r, ChainResult) else int(r) for r in results)
    return [sum(n[j] for j in range(k, NUM_SUBTASKS + 1)) / len(results) for k in range(1, NUM_SUBTASKS + 1)]


def average_length(results: list[ChainResult | int]) -> float:
    """Avg. Len.: mean number of subtasks completed in a row, 0..5 (equals the sum of sr_1..sr_5)."""
    if not results:
        raise ValueError("average_length needs at least one chain result")
    return float(np.mean([r.completed if isinstance(r, ChainResult) else int(r) for r in results]))


def summary(results: list[ChainResult]) -> dict:
    """The ``avg_seq_len`` / ``chain_sr`` / ``task_info`` fields of CALVIN's ``results.json``."""
    attempted, succeeded = Counter(), Counter()
    for r in results:
        for i, t in enumerate(r.subtasks[: r.completed + 1]):
            attempted[t] += 1
            succeeded[t] += i < r.completed
    return {"avg_seq_len": average_length(results),
            "chain_sr": {i + 1: sr for i, sr in enumerate(count_success(results))},
            "task_info": {t: {"success": succeeded[t], "total": attempted[t]} for t in sorted(attempted)}}


def chain_metrics(histogram: Sequence[int]) -> dict:
    """``avg_seq_len`` and ``chain_sr`` from ``histogram[k]`` = number of error-free chains that completed
    exactly k subtasks (k = 0..5); the form a cross-process sum of counts arrives in. Both are None (JSON
    null) when no chain finished without error, never a made-up 0."""
    hist = [int(h) for h in histogram]
    if len(hist) != NUM_SUBTASKS + 1 or min(hist) < 0:
        raise ValueError(f"histogram needs {NUM_SUBTASKS + 1} non-negative counts (0..{NUM_SUBTASKS} subtasks "
                         f"completed), got {hist}")
    n = sum(hist)
    if n == 0:
        return {"avg_seq_len": None, "chain_sr": None, "chains": 0}
    return {"avg_seq_len": sum(k * h for k, h in enumerate(hist)) / n,
            "chain_sr": {k: sum(hist[k:]) / n for k in range(1, NUM_SUBTASKS + 1)}, "chains": n}


def check_subtasks(chains: Sequence[Chain], instructions: Mapping[str, str] | Callable[[str], str],
                   known: set[str] | None = None, source: str = "the chains") -> None:
    """Fail before any rollout when a chain names a subtask without an instruction (or unknown to the
    oracle, when ``known`` is given): such a chain would otherwise crash hours into an evaluation."""
    names = {t for c in chains for t in c.subtasks}
    missing = sorted(names - set(instructions)) if isinstance(instructions, Mapping) else []
    if missing:
        raise ValueError(f"{source} use subtasks with no instruction phrasing: {missing[:8]} (the annotations "
                         "file, e.g. new_playtable_validation.yaml, must have a key for each)")
    unknown = sorted(names - known) if known is not None else []
    if unknown:
        raise ValueError(f"{source} use subtasks the task oracle does not define: {unknown[:8]} (keys of "
                         "'tasks' in new_playtable_tasks.yaml)")


class _GuardedEnv:
    """Times a :class:`CalvinEnv` and turns any exception it raises into ``EnvError`` (a simulator crash),
    so that :func:`run_chain_attempt` can tell crashes from policy bugs, which propagate."""

    def __init__(self, env: CalvinEnv):
        self.env, self.seconds = env, 0.0

    def _call(self, fn, *args):
        start = time.perf_counter()
        try:
            return sim_call(fn, *args)
        finally:
            self.seconds += time.perf_counter() - start

    def reset(self, initial_state: Any) -> Obs:
        return self._call(self.env.reset, initial_state)

    def step(self, action: np.ndarray) -> tuple[Obs, dict]:
        return self._call(self.env.step, action)

    def get_info(self) -> dict:
        return self._call(self.env.get_info)


def run_chain_attempt(env: CalvinEnv, policy: RolloutPolicy, chain: Chain, index: int, oracle: Oracle,
                      instructions: Mapping[str, str] | Callable[[str], str], *, attempt: int = 0, seed: int = 0,
                      ep_len: int = EP_LEN, executor: ActionExecutor | None = None,
                      normalizer: Normalizer | None = None, image_size: int = 224,
                      record_frames: bool = False) -> tuple[dict, ChainResult]:
    """One attempt at chain ``index``: its JSON-ready record and the :class:`ChainResult` (with the frames
    when ``record_frames``).

    An exception from the env or the oracle (which reads the simulator's info dicts) is a simulator crash:
    the record then has ``error`` set and ``completed`` 0, and must never be counted. A policy exception is a
    bug and propagates. ``success`` is "all 5 subtasks done" (what a progress bar shows); ``completed`` is
    the number that counts.
    """
    torch.manual_seed(seed)
    np.random.seed((seed + index) % 2**32)
    guarded = _GuardedEnv(env)

    def guarded_oracle(start: dict, current: dict, subtask: str) -> bool:
        return sim_call(oracle, start, current, subtask)

    error, result = None, ChainResult(list(chain.subtasks), 0)
    try:
        run_chain(guarded, policy, chain, guarded_oracle, instructions, ep_len, executor, normalizer, image_size,
                  record_frames, result)
    except EnvError as e:
        error = str(e)
    result.seconds_sim = guarded.seconds
    return chain_record(index, chain, seed, attempt, result, error), result


def chain_record(index: int, chain: Chain, seed: int, attempt: int, result: ChainResult, error: str | None) -> dict:
    """The JSON line of one chain attempt. A crashed attempt counts nothing: ``completed`` 0, no steps."""
    crashed = error is not None
    return {"chain": index, "task": 0, "episode": index, "seed": seed, "subtasks": list(chain.subtasks),
            "completed": 0 if crashed else result.completed, "steps": [] if crashed else list(result.steps),
            "success": not crashed and result.completed == NUM_SUBTASKS, "error": error, "attempt": attempt,
            "seconds_sim": result.seconds_sim, "seconds_policy": result.seconds_policy}


def run_chain_wave(pool, policy, chains: Sequence[tuple[int, Chain, int]],
                   instructions: Mapping[str, str] | Callable[[str], str], *, seed: int = 0, ep_len: int = EP_LEN,
                   executor_factory: Callable[[], ActionExecutor] = FirstActionExecutor,
                   normalizer: Normalizer | None = None, image_size: int = 224,
                   record_frames: bool | Sequence[bool] = False) -> list[tuple[dict, ChainResult]]:
    """Run ``chains`` (``(index, chain, attempt)``, at most ``pool.size``) concurrently on an
    :class:`~vitavla.rollout.parallel.EnvPool` of CALVIN envs, chain ``k`` on worker ``k``, with one batched
    policy call per control step; returns what :func:`run_chain_attempt` returns, per chain, in order.

    Chains advance in subtask waves: subtask ``j`` of every chain still going starts together (the policy is
    reset, as run_chain does per subtask, since a streaming batch shares one timeline) and the next starts
    when all have finished it. A chain that finishes a subtask early waits, its simulator untouched, so each
    chain runs exactly as it would alone (records equal run_chain_attempt's for deterministic envs and
    policies). The oracle runs in the workers. A chain whose simulator crashes is recorded with its error and
    leaves the batch; its worker rebuilds the env. Seeding: each worker seeds numpy with ``seed + index``
    before its reset, as run_chain_attempt; torch is seeded once per wave.
    """
    from vitavla.rollout.parallel import WaveRows, check_wave, lockstep, record_flags

    n = check_wave(pool, policy, len(chains))
    rows = WaveRows.new(n, record_flags(record_frames, n))
    text = instructions if callable(instructions) else instructions.__getitem__
    torch.manual_seed(seed)
    results = [ChainResult(list(chain.subtasks), 0) for _, chain, _ in chains]
    going = rows.take_reset(pool.run({k: ("chain_reset", (chain.initial_state, (seed + i) % 2**32))
                                      for k, (i, chain, _) in enumerate(chains)}))
    for j in range(NUM_SUBTASKS):
        if not going:
            break
        subtask = {k: chains[k][1].subtasks[j] for k in going}
        going = rows.take_reset(pool.run({k: ("subtask", (subtask[k], text(subtask[k]))) for k in going}))
        policy.reset()  # model.reset() per subtask, for the whole batch at once
        for k in going:
            results[k].instructions.append(rows.obs[k].instruction)
            rows.executors[k] = executor_factory()
            rows.executors[k].reset()
            rows.steps[k], rows.success[k] = 0, False
        lockstep(pool, policy, rows, going, ep_len, normalizer, image_size)
        going = [k for k in going if rows.errors[k] is None and rows.success[k]]
        for k in subtask:
            if rows.errors[k] is None:
                results[k].steps.append(rows.steps[k])
                results[k].completed += int(rows.success[k])
    out = []
    for k, (i, chain, attempt) in enumerate(chains):
        res = results[k]
        res.frames, res.first_last = rows.frames[k], rows.first_last[k]
        res.seconds_sim, res.seconds_policy = rows.sim[k], rows.pol[k]
        out.append((chain_record(i, chain, seed, attempt, res, rows.errors[k]), res))
    return out


def summarize_chains(records: Sequence[dict]) -> dict:
    """CALVIN's results (``avg_seq_len``, ``chain_sr``, ``task_info``) over the error-free final records,
    plus ``errors`` (chains whose every attempt crashed) and their details. Crashed chains are reported,
    never counted as failures."""
    ok = [r for r in records if r["error"] is None]
    hist = Counter(int(r["completed"]) for r in ok)
    out = chain_metrics([hist[k] for k in range(NUM_SUBTASKS + 1)])
    out["task_info"] = summary([ChainResult(r["subtasks"], r["completed"]) for r in ok])["task_info"] if ok else {}
    out["errors"] = len(records) - len(ok)
    out["error_details"] = [{"chain": r["chain"], "error": r["error"]} for r in records if r["error"] is not None]
    out["seconds_sim"] = sum(r.get("seconds_sim", 0.0) for r in records)
    out["seconds_policy"] = sum(r.get("seconds_policy", 0.0) for r in records)
    return out


def _check_record(path: Path, record: dict, chains: Sequence[Chain]) -> int:
    i = record.get("chain")
    if not isinstance(i, int) or not 0 <= i < len(chains):
        raise ValueError(f"{path}: record for chain {i!r}, but this evaluation has chains 0..{len(chains) - 1}; "
                         "use a new results file for a different chain set")
    if record.get("subtasks") != chains[i].subtasks:
        raise ValueError(f"{path}: chain {i} was recorded as {record.get('subtasks')} but is now "
                         f"{chains[i].subtasks}; the results file belongs to another chain set (another "
                         "eval_sequences.json or num_chains): use a new results file")
    return i


def evaluate_calvin(env_factory: Callable[[], CalvinEnv], policy, chains: Sequence[Chain], results_path: str | Path,
                    retries: int = 1, *, oracle: Oracle | None = None,
                    instructions: Mapping[str, str] | Callable[[str], str] | None = None, ep_len: int = EP_LEN,
                    executor_factory: Callable[[], ActionExecutor] | None = None,
                    normalizer: Normalizer | None = None, image_size: int = 224, seed: int = 0,
                    progress: bool = True) -> dict:
    """CALVIN long-horizon evaluation of ``chains``, resumable, with simulator crashes kept apart.

    Every finished chain attempt is appended to ``results_path`` as one JSON line (flushed and fsync'd), so
    a killed run restarted with the same file skips the chains already finished and ends with the same
    totals (a line cut short by the kill is dropped and that chain re-run). A chain is finished when it has
    an error-free record or ``1 + retries`` error records from this run (a rerun retries chains that only
    crashed before); after a crash the env is closed and rebuilt with
    ``env_factory``, since its state is not trusted.

    ``oracle`` and ``instructions`` default to the env's ``oracle`` / ``instructions`` attributes
    (:class:`~vitavla.rollout.calvin_env.CalvinSimEnv` loads them from the CALVIN config files). The
    executor defaults to Seer's (first action of each chunk). Returns :func:`summarize_chains` of the final
    records: ``avg_seq_len``, ``chain_sr`` {1..5}, ``chains`` (error-free), ``errors``, ``task_info``.
    """
    if not chains:
        raise ValueError("evaluate_calvin needs at least one chain")
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(path, retries, check=lambda file, record: _check_record(file, record, chains))
    specs = [EpisodeSpec(0, i, seed) for i in range(len(chains))]
    pending = [s for s in specs if not ledger.finished(s.key)]
    env = env_factory() if pending or oracle is None or instructions is None else None
    oracle = oracle if oracle is not None else getattr(env, "oracle", None)
    instructions = instructions if instructions is not None else getattr(env, "instructions", None)
    if oracle is None or instructions is None:
        raise ValueError(f"no task oracle / instructions: pass oracle= and instructions=, or use an env that "
                         f"provides them ({type(env).__name__} has no 'oracle' / 'instructions' attribute)")
    check_subtasks(chains, instructions, getattr(env, "known_subtasks", None))
    policy = as_rollout_policy(policy)
    make_executor = executor_factory or FirstActionExecutor
    bar = tqdm(total=len(chains), initial=len(chains) - len(pending), desc="chains", disable=not progress,
               dynamic_ncols=True)

    def one(wave: list[EpisodeSpec]) -> list[tuple[dict, ChainResult]]:
        nonlocal env
        (spec,) = wave
        i = spec.episode_index
        rec, res = run_chain_attempt(env, policy, chains[i], i, oracle, instructions,
                                     attempt=ledger.attempts(spec.key), seed=seed, ep_len=ep_len,
                                     executor=make_executor(), normalizer=normalizer, image_size=image_size)
        if rec["error"] is not None:
            # Rebuilt after every crash, the last attempt's too: no chain runs on a crashed simulator.
            log.warning("chain %d crashed (attempt %d): %s", i, rec["attempt"], rec["error"])
            close_quietly(env)
            env = env_factory()
        return [(rec, res)]

    try:
        finals = run_attempts(specs, ledger, one, on_finished=lambda spec, final: bar.update(1))
    finally:
        bar.close()
        if env is not None:
            close_quietly(env)
    return summarize_chains(finals)


