import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from teachers.base import ActionOutput
from tests.conftest import tiny_policy
from vitavla.rollout.calvin_protocol import (Chain, ChainResult, average_length, calvin_oracle, chain_metrics,
                                             count_success, evaluate_calvin, load_chains, run_chain, summary)
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


# -- evaluate_calvin: resumable, crashes recorded and retried, never counted -----------------------------------
POOL = ["a", "b", "c", "d", "e", "f", "g"]
POOL_PLAN = {"a": 1, "b": 2, "c": None, "d": 1, "e": 3, "f": 1, "g": None}


def pool_chains(n=8):
    # Windows over the pool: chains stop at c or g at different depths, so completed counts differ.
    return [Chain({"chain": i}, [POOL[(i + j) % len(POOL)] for j in range(5)]) for i in range(n)]


def expected_completed(chain):
    done = 0
    for t in chain.subtasks:
        if POOL_PLAN[t] is None:
            break
        done += 1
    return done


class CrashingCalvinEnv(FakeCalvinEnv):
    """Crashes in ``step`` while ``crashes[chain] > 0`` (shared across rebuilt envs, one crash per attempt)."""

    built = []

    def __init__(self, crashes):
        super().__init__(POOL_PLAN)
        self.crashes, self.closed, self.chain = crashes, False, None
        CrashingCalvinEnv.built.append(self)

    def reset(self, initial_state):
        self.chain = initial_state["chain"]
        return super().reset(initial_state)

    def step(self, action):
        if self.crashes.get(self.chain, 0) > 0:
            self.crashes[self.chain] -= 1
            raise RuntimeError(f"physics blew up in chain {self.chain}")
        return super().step(action)

    def close(self):
        self.closed = True


class KilledPolicy(CountingPolicy):
    """Dies (like a kill) at its ``at``-th query."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def step(self, obs):
        if len(self.instructions) == self.at:
            raise KeyboardInterrupt
        return super().step(obs)


def evaluate(path, chains, policy=None, crashes=None, **kw):
    crashes = {} if crashes is None else crashes
    return evaluate_calvin(lambda: CrashingCalvinEnv(crashes), policy or CountingPolicy(), chains, path,
                           oracle=oracle(POOL_PLAN), instructions=text, ep_len=4, progress=False, **kw)


def totals(res):
    return {k: v for k, v in res.items() if not k.startswith("seconds")}


def test_evaluate_calvin_counts_like_run_chain(tmp_path):
    chains = pool_chains()
    res = evaluate(tmp_path / "r.jsonl", chains)
    completed = [expected_completed(c) for c in chains]
    assert res["chains"] == 8 and res["errors"] == 0
    assert res["avg_seq_len"] == pytest.approx(average_length(completed))
    assert list(res["chain_sr"].values()) == pytest.approx(count_success(completed))
    assert res["task_info"]["c"] == {"success": 0, "total": sum(1 for c in chains if "c" in c.subtasks[:expected_completed(c) + 1])}


def test_killed_evaluation_resumes_without_rerunning_and_gives_identical_totals(tmp_path):
    chains = pool_chains()
    reference = evaluate(tmp_path / "ref.jsonl", chains)
    path = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(path, chains, KilledPolicy(at=12))
    finished = [json.loads(x)["chain"] for x in path.read_text().splitlines()]
    assert 0 < len(finished) < len(chains) and finished == list(range(len(finished)))
    with open(path, "a") as f:
        f.write('{"chain": 7, "subtasks": ["a"')  # a line cut short by the kill
    CrashingCalvinEnv.built = []
    resumed = evaluate(path, chains)
    reset_chains = [s["chain"] for env in CrashingCalvinEnv.built for s in env.initial_states]
    assert reset_chains == list(range(len(finished), len(chains)))  # finished chains are not re-run
    assert totals(resumed) == totals(reference)
    assert len(path.read_text().splitlines()) == len(chains)  # the partial line was dropped, chain 7 run once
    again = evaluate(path, chains)  # nothing left to run: same totals, file untouched
    assert totals(again) == totals(reference) and len(path.read_text().splitlines()) == len(chains)


def test_crashed_chain_is_retried_once_with_a_fresh_env_and_never_counted(tmp_path):
    chains = pool_chains(4)
    CrashingCalvinEnv.built = []
    path = tmp_path / "r.jsonl"
    res = evaluate(path, chains, crashes={1: 1, 2: 5})  # chain 1 crashes once, chain 2 every time
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["chain"], r["attempt"], r["error"] is not None) for r in recs] == [
        (0, 0, False), (1, 0, True), (1, 1, False), (2, 0, True), (2, 1, True), (3, 0, False)]
    assert "physics blew up in chain 2" in recs[4]["error"]
    assert res["errors"] == 1 and res["chains"] == 3
    assert res["error_details"] == [{"chain": 2, "error": recs[4]["error"]}]
    kept = [expected_completed(chains[i]) for i in (0, 1, 3)]
    assert res["avg_seq_len"] == pytest.approx(average_length(kept))  # the crashed chain is not a 0
    assert len(CrashingCalvinEnv.built) == 4 and all(e.closed for e in CrashingCalvinEnv.built)
    # retries=0 on a fresh file: one attempt, then reported as an error.
    res0 = evaluate(tmp_path / "r0.jsonl", chains, crashes={1: 1}, retries=0)
    assert res0["errors"] == 1 and res0["chains"] == 3


def test_results_file_of_another_chain_set_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    evaluate(path, pool_chains(3))
    other = [Chain({"chain": i}, list(reversed(c.subtasks))) for i, c in enumerate(pool_chains(3))]
    with pytest.raises(ValueError, match="another chain set"):
        evaluate(path, other)
    with pytest.raises(ValueError, match="chains 0..1"):
        evaluate(path, pool_chains(2))


def test_policy_bugs_propagate_instead_of_being_recorded_as_crashes(tmp_path):
    class Broken(CountingPolicy):
        def step(self, obs):
            raise ZeroDivisionError("policy bug")

    path = tmp_path / "r.jsonl"
    with pytest.raises(ZeroDivisionError):
        evaluate(path, pool_chains(2), Broken())
    assert not path.exists() or path.read_text() == ""


def test_chain_metrics_from_a_histogram():
    completed = [0, 1, 2, 5, 5, 3]
    hist = [completed.count(k) for k in range(6)]
    m = chain_metrics(hist)
    assert m["chains"] == 6 and m["avg_seq_len"] == pytest.approx(average_length(completed))
    assert list(m["chain_sr"].values()) == pytest.approx(count_success(completed))
    assert chain_metrics([0] * 6) == {"avg_seq_len": None, "chain_sr": None, "chains": 0}
    with pytest.raises(ValueError, match="6 non-negative counts"):
        chain_metrics([1, 2])
