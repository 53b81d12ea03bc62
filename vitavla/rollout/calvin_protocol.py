"""CALVIN long-horizon evaluation logic, simulator-free (ecosystem spec §3.5, seer spec §6.2).

Mirrors ``calvin_agent/evaluation/evaluate_policy.py``: every chain starts from its initial scene state
(the env is reset once per chain, never between subtasks), every subtask resets the policy, uses the
subtask's instruction, runs up to ``ep_len = 360`` steps and succeeds as soon as the task oracle reports
it after a step; the chain stops at its first failed subtask. A calvin_env adapter implements
:class:`CalvinEnv`; the oracle is any ``(start_info, current_info, subtask) -> bool``, e.g.
:func:`calvin_oracle` around ``calvin_env.envs.tasks.Tasks``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from datamodules.normalization import Normalizer
from vitavla.rollout.env import Obs
from vitavla.rollout.executors import ActionExecutor, FirstActionExecutor
from vitavla.rollout.runner import Controller, StepPolicy, as_step_policy

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


def run_chain(env: CalvinEnv, policy: StepPolicy, chain: Chain, oracle: Oracle,
              instructions: Mapping[str, str] | Callable[[str], str], ep_len: int = EP_LEN,
              executor: ActionExecutor | None = None, normalizer: Normalizer | None = None,
              image_size: int = 224) -> ChainResult:
    """Roll out one chain. ``instructions`` maps a subtask to its text (official: ``val_annotations[t][0]``).

    The default executor is Seer's: the first action of each predicted chunk, gripper thresholded.
    """
    if ep_len < 1:
        raise ValueError(f"ep_len must be >= 1, got {ep_len}")
    ctl = Controller(as_step_policy(policy), executor or FirstActionExecutor(), normalizer, image_size)
    text = instructions if callable(instructions) else instructions.__getitem__
    obs = env.reset(chain.initial_state)
    result = ChainResult(list(chain.subtasks), 0)
    for subtask in chain.subtasks:
        ctl.reset()  # model.reset(): no history carries over from the previous subtask
        start_info = env.get_info()
        instruction = text(subtask)
        done = False
        for t in range(ep_len):
            obs, info = env.step(ctl.act(t, obs, instruction))
            if oracle(start_info, info, subtask):
                done = True
                break
        result.steps.append(t + 1)
        if not done:
            return result
        result.completed += 1
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
