import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from teachers.base import ActionOutput
from tests.vitavla.helpers import tiny_policy
from vitavla.rollout.calvin_protocol import (Chain, ChainResult, average_length, calvin_oracle, count_success,
                                             load_chains, run_chain, summary)
from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.executors import TemporalEnsembleExecutor
from vitavla.streaming import StreamingPolicy

SUBTASKS = ["open_drawer", "lift_blue_block_table", "push_red_block_left", "turn_on_led", "close_drawer"]


class FakeCalvinEnv:
    """Subtask s succeeds ``plan[s]`` steps after it starts (None: never). Time never restarts within a
    chain, so the oracle only works if start_info is taken at each subtask's start and the env is not
    reset."""

    def __init__(self, plan):
        self.plan, self.t, self.resets, self.actions, self.initial_states = plan, 0, 0, [], []
        self._scene = ScriptedStandInEnv(image_size=16)

    def reset(self, initial_state):
        self.resets += 1
        self.initial_states.append(initial_state)
        self.t = 0
        return self._scene.reset(0, 0)

    def get_info(self):
        return {"t": self.t}

    def step(self, action):
        self.actions.append(np.asarray(action))
        self.t += 1
        return self._scene._obs(), self.get_info()


def oracle(plan):
    def check(start, current, subtask):
        return plan[subtask] is not None and current["t"] - start["t"] >= plan[subtask]

    return check


class CountingPolicy:
    def __init__(self):
        self.resets, self.instructions = 0, []

    def reset(self):
        self.resets += 1

    def step(self, obs):
        self.instructions.append(obs.instruction[0])
        return ActionOutput(torch.zeros(1, 3, 6), torch.full((1, 3, 1), 4.0))


def text(subtask):
    return subtask.replace("_", " ")


def run(plan, ep_len=10):
    env, policy = FakeCalvinEnv(plan), CountingPolicy()
    res = run_chain(env, policy, Chain({"scene": "D"}, SUBTASKS), oracle(plan), text, ep_len=ep_len)
    return res, env, policy


def test_chain_stops_at_first_failure_and_resets_policy_per_subtask():
    plan = dict(zip(SUBTASKS, [2, 3, None, 1, 1]))
    res, env, policy = run(plan)
    assert res.completed == 2 and res.steps == [2, 3, 10]
    assert env.resets == 1 and env.initial_states == [{"scene": "D"}]
    assert policy.resets == 3  # one per attempted subtask, none for the two never reached
    expected = ["open drawer"] * 2 + ["lift blue block table"] * 3 + ["push red block left"] * 10
    assert policy.instructions == expected
    assert len(env.actions) == 15 and env.actions[0].tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_full_chain_and_first_subtask_failure():
    res, env, policy = run(dict(zip(SUBTASKS, [1, 2, 3, 4, 5])))
    assert res.completed == 5 and res.steps == [1, 2, 3, 4, 5] and env.t == 15 and env.resets == 1
    res, env, policy = run(dict.fromkeys(SUBTASKS), ep_len=4)
    assert res.completed == 0 and res.steps == [4] and policy.resets == 1


def test_success_is_checked_after_every_step():
    # Succeeds at exactly the last allowed step: still a success.
    res, _, _ = run(dict(zip(SUBTASKS, [10, 10, 11, 1, 1])), ep_len=10)
    assert res.completed == 2 and res.steps == [10, 10, 10]


def official_count_success(results):
    """calvin_agent/evaluation/utils.py, copied."""
    count = Counter(results)
    step_success = []
    for i in range(1, 6):
        n_success = sum(count[j] for j in reversed(range(i, 6)))
        sr = n_success / len(results)
        step_success.append(sr)
    return step_success


def test_count_success_and_average_length_hand_computed():
    results = [ChainResult(SUBTASKS, n) for n in [0, 1, 2, 5, 5, 3]]
    assert count_success(results) == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 2 / 6])
    assert average_length(results) == pytest.approx(16 / 6)
    assert average_length(results) == pytest.approx(sum(count_success(results)))


def test_count_success_matches_the_official_definition():
    rng = random.Random(0)
    for _ in range(20):
        results = [rng.randint(0, 5) for _ in range(rng.randint(1, 50))]
        assert count_success(results) == official_count_success(results)
    with pytest.raises(ValueError):
        count_success([])


def test_summary_task_info_counts_attempts():
    results = [ChainResult(SUBTASKS, 2), ChainResult(SUBTASKS, 5), ChainResult(SUBTASKS[::-1], 0)]
    s = summary(results)
    assert s["avg_seq_len"] == pytest.approx(7 / 3) and s["chain_sr"][1] == pytest.approx(2 / 3)
    assert s["task_info"]["open_drawer"] == {"success": 2, "total": 2}
    assert s["task_info"]["push_red_block_left"] == {"success": 1, "total": 2}
    assert s["task_info"]["close_drawer"] == {"success": 1, "total": 2}


def test_load_chains_official_format(tmp_path):
    official = [[{"led": 0, "lightbulb": 1}, SUBTASKS], [{"led": 1, "lightbulb": 0}, SUBTASKS[::-1]]]
    path = tmp_path / "eval_sequences.json"
    path.write_text(json.dumps(official))
    chains = load_chains(path)
    assert chains == load_chains(official) and chains[1].subtasks == SUBTASKS[::-1]
    assert chains[0].initial_state == {"led": 0, "lightbulb": 1}
    with pytest.raises(ValueError):
        load_chains([[{}, SUBTASKS[:4]]])
    with pytest.raises(ValueError):
        load_chains([SUBTASKS])


def test_calvin_oracle_adapter():
    class Tasks:  # calvin_env.envs.tasks.Tasks' method signature
        def get_task_info_for_set(self, start, current, subtasks):
            return {t for t in subtasks if current.get(t)}

    o = calvin_oracle(Tasks())
    assert o({}, {"open_drawer": True}, "open_drawer") and not o({}, {}, "open_drawer")


def test_chain_with_tiny_real_streaming_policy():
    # StreamingPolicy refuses an instruction change without reset(): this checks the per-subtask reset.
    plan = dict(zip(SUBTASKS, [2, 1, None, 1, 1]))
    stream = StreamingPolicy(tiny_policy("internvl"))
    res = run_chain(FakeCalvinEnv(plan), stream, Chain(None, SUBTASKS), oracle(plan), text, ep_len=2,
                    executor=TemporalEnsembleExecutor())
    assert res.completed == 2 and res.steps == [2, 1, 2] and stream.held_steps == 2
