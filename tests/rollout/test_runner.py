import json

import numpy as np
import pytest
import torch

from teachers.base import ActionOutput
from tests.conftest import tiny_policy
from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.executors import ChunkExecutor, FirstActionExecutor, TemporalEnsembleExecutor
from vitavla.rollout.runner import EpisodeSpec, evaluate, load_results, run_episode, shard, to_observation
from vitavla.streaming import StreamingPolicy


class ReachingStub:
    """Scripted policy with StreamingPolicy's interface: heads for the goal read from the state
    (x, y, gx, gy),
    but only when the instruction names one of ``solves``, so success per task is known in advance."""

    def __init__(self, solves=("top left",), chunk=3, speed=0.25, fail_on_reset=None):
        self.solves, self.chunk, self.speed, self.fail_on_reset = solves, chunk, speed, fail_on_reset
        self.resets = self.steps = 0
        self.instructions = []

    def reset(self):
        self.resets += 1
        if self.fail_on_reset is not None and self.resets == self.fail_on_reset:
            raise KeyboardInterrupt("evaluation stopped")

    def step(self, obs):
        assert obs.images.dtype == torch.uint8 and obs.images.shape[1:3] == (2, 3)
        self.steps += 1
        self.instructions.append(obs.instruction[0])
        s = obs.state
        move = (s[:, 2:4] - s[:, 0:2]) / self.speed
        if not any(name in obs.instruction[0] for name in self.solves):
            move = -move  # walks away from the goal: a guaranteed failure
        arm = torch.zeros(s.shape[0], self.chunk, 6)
        arm[:, :, :2] = move.clamp(-1, 1)[:, None]
        return ActionOutput(arm, torch.full((s.shape[0], self.chunk, 1), 3.0))


def specs(tasks=2, episodes=3):
    return [EpisodeSpec(t, e, seed=7) for t in range(tasks) for e in range(episodes)]


def test_run_episode_with_scripted_policy_succeeds_and_times_both_sides():
    env = ScriptedStandInEnv(steps=8)
    res = run_episode(env, ReachingStub(), FirstActionExecutor(), EpisodeSpec(0, 0), image_size=16,
                      settle_steps=2, record_frames=True)
    assert res.success and res.error is None and 1 <= res.steps <= 8
    assert env._t == res.steps + 2  # settle steps are env steps, not policy steps
    assert res.seconds_sim > 0 and res.seconds_policy > 0
    # A frame per observation: the one after reset (and settling) through the outcome after the last step.
    assert len(res.frames) == res.steps + 1 and res.frames[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(res.frames[-1], env._obs().static)
    assert res.first_last[0] is res.frames[0] and res.first_last[1] is res.frames[-1]
    assert res.instruction == "move to the top left target"
    fail = run_episode(env, ReachingStub(), FirstActionExecutor(), EpisodeSpec(1, 0), image_size=16)
    assert not fail.success and fail.steps == 8 and fail.frames is None
    # Unrecorded episodes still keep their first and last frame (for the first/last sheet of all episodes).
    first, last = fail.first_last
    assert first.shape == last.shape == (32, 32, 3) and not np.array_equal(first, last)
    np.testing.assert_array_equal(last, env._obs().static)


class SeenFrames(ReachingStub):
    """Also keeps the static view of every observation the policy gets."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def step(self, obs):
        self.seen.append(obs.images[0, 0].clone())
        return super().step(obs)


def test_only_recorded_episodes_render_the_video_camera():
    env = ScriptedStandInEnv(steps=8, image_size=32, video_size=96)
    spec = EpisodeSpec(0, 0)
    plain, recorded = SeenFrames(), SeenFrames()
    a = run_episode(env, plain, FirstActionExecutor(), spec, image_size=16)
    assert not env._recording and a.first_last[0].shape == (32, 32, 3)  # no video camera: the policy frame
    b = run_episode(env, recorded, FirstActionExecutor(), spec, image_size=16, record_frames=True)
    assert env._recording and b.success == a.success and b.steps == a.steps
    assert [f.shape for f in b.frames] == [(96, 96, 3)] * (b.steps + 1)
    assert b.first_last[0].shape == (96, 96, 3)
    # The video camera is for people only: the policy saw the same frames in both episodes.
    assert len(plain.seen) == len(recorded.seen) and all(map(torch.equal, plain.seen, recorded.seen))
    c = run_episode(env, ReachingStub(), FirstActionExecutor(), spec, image_size=16)
    assert not env._recording and c.first_last[1].shape == (32, 32, 3)  # switched off again for the next one


def test_chunk_executor_queries_every_chunk():
    policy = ReachingStub(solves=())
    run_episode(ScriptedStandInEnv(steps=7), policy, ChunkExecutor(), EpisodeSpec(1, 0), image_size=16)
    assert policy.steps == 3  # steps 0, 3, 6


def test_observation_is_resized_uint8_two_views():
    obs = ScriptedStandInEnv(image_size=40).reset(0, 0)
    o = to_observation(obs, 24)
    assert o.images.shape == (1, 2, 3, 24, 24) and o.images.dtype == torch.uint8
    assert o.state.shape == (1, 7) and o.instruction == ["move to the top left target"]
    assert to_observation(obs, 40).images[0, 0].permute(1, 2, 0).numpy().tolist() == obs.static.tolist()


def test_tiny_real_streaming_policy_runs_episodes(tmp_path):
    stream = StreamingPolicy(tiny_policy("internvl"))
    env = ScriptedStandInEnv(steps=3, image_size=32)
    res = run_episode(env, stream, TemporalEnsembleExecutor(), EpisodeSpec(0, 0), image_size=224)
    assert res.error is None and (res.success or res.steps == 3)
    assert res.seconds_policy > 0 and stream.held_steps == res.steps
    out = evaluate(lambda: ScriptedStandInEnv(steps=2, image_size=32), stream, specs(2, 1),
                   FirstActionExecutor,
                   str(tmp_path / "r.jsonl"), progress=False)
    assert out["episodes"] == 2 and out["errors"] == 0


def test_success_counting_per_task(tmp_path):
    out = evaluate(lambda: ScriptedStandInEnv(steps=8), ReachingStub(), specs(), FirstActionExecutor,
                   str(tmp_path / "r.jsonl"), image_size=16, progress=False)
    assert out["success_rate"] == 0.5 and out["successes"] == 3
    assert out["episodes"] == 6 and out["errors"] == 0
    assert out["per_task"][0] == {"name": "reach_top_left", "successes": 3, "episodes": 3, "errors": 0,
                                  "success_rate": 1.0, "success_ci95": [pytest.approx(0.4385, abs=1e-4), 1.0]}
    assert out["per_task"][1]["success_rate"] == 0.0
    assert out["per_task"][1]["success_ci95"] == [0.0, pytest.approx(0.5615, abs=1e-4)]  # 0/3
    assert out["success_ci95"] == pytest.approx([0.1876, 0.8124], abs=1e-4)  # 3/6
    lines = load_results(tmp_path / "r.jsonl")
    assert len(lines) == 6 and all(r["seconds_sim"] > 0 and r["seconds_policy"] > 0 for r in lines)


def test_resume_runs_only_remaining_specs_with_identical_totals(tmp_path):
    run = dict(image_size=16, progress=False)
    full = evaluate(lambda: ScriptedStandInEnv(steps=8), ReachingStub(), specs(), FirstActionExecutor,
                    str(tmp_path / "full.jsonl"), **run)
    path = str(tmp_path / "part.jsonl")
    with pytest.raises(KeyboardInterrupt):  # stopped while starting the 4th episode
        evaluate(lambda: ScriptedStandInEnv(steps=8), ReachingStub(fail_on_reset=4), specs(),
                 FirstActionExecutor, path, **run)
    assert len(load_results(path)) == 3
    with open(path, "a") as f:
        f.write('{"task": 1, "epis')  # a record cut short by the kill is dropped, and its episode re-run
    policy = ReachingStub()
    again = evaluate(lambda: ScriptedStandInEnv(steps=8), policy, specs(), FirstActionExecutor, path, **run)
    assert policy.resets == 3
    assert again == full and len(load_results(path)) == 6
    policy = ReachingStub()
    again = evaluate(lambda: ScriptedStandInEnv(steps=8), policy, specs(), FirstActionExecutor, path, **run)
    assert again == full
    assert policy.resets == 0


def test_shards_cover_every_spec_once_and_sum_to_the_full_run(tmp_path):
    all_specs = specs(2, 5)
    parts = [shard(all_specs, r, 3) for r in range(3)]
    flat = [s for p in parts for s in p]
    assert sorted(s.key for s in flat) == sorted(s.key for s in all_specs) and len(flat) == len(all_specs)
    assert parts == [shard(all_specs, r, 3) for r in range(3)]  # deterministic
    outs = [evaluate(lambda: ScriptedStandInEnv(steps=8), ReachingStub(), p, FirstActionExecutor,
                     str(tmp_path / f"rank{r}.jsonl"), image_size=16, progress=False)
            for r, p in enumerate(parts)]
    assert sum(o["successes"] for o in outs) == 5 and sum(o["episodes"] for o in outs) == 10
    with pytest.raises(ValueError):
        shard(all_specs, 3, 3)


def test_crash_is_recorded_retried_once_and_excluded(tmp_path):
    made = []

    def flaky():  # the first env crashes in episode (0, 1); the rebuilt one does not
        made.append(ScriptedStandInEnv(steps=8, crash_at=1 if not made else None, crash_episodes={(0, 1)}))
        return made[-1]

    path = tmp_path / "r.jsonl"
    out = evaluate(flaky, ReachingStub(), specs(1, 3), FirstActionExecutor, str(path), image_size=16,
                   progress=False)
    recs = load_results(path)
    assert [(r["episode"], r["attempt"], r["error"] is None) for r in recs] == [(0, 0, True), (1, 0, False),
                                                                               (1, 1, True), (2, 0, True)]
    assert "scripted simulator crash" in recs[1]["error"] and len(made) == 2
    assert out["errors"] == 0 and out["episodes"] == 3 and out["success_rate"] == 1.0

    path = tmp_path / "always.jsonl"
    built = []

    def always():
        built.append(ScriptedStandInEnv(steps=8, crash_at=0, crash_episodes={(0, 1)}))
        return built[-1]

    out = evaluate(always, ReachingStub(), specs(1, 3), FirstActionExecutor, str(path), image_size=16,
                   progress=False)
    assert out["errors"] == 1 and out["episodes"] == 2
    # Rebuilt after each of the 2 crashes, the last attempt's too: episode 2 never runs on a crashed env.
    assert len(built) == 3
    assert out["successes"] == 2 and out["success_rate"] == 1.0
    assert out["per_task"][0]["errors"] == 1 and len(load_results(path)) == 4  # 2 attempts for the crash
    # A rerun skips the finished episodes but retries the crashed one (a recorded error is never the
    # policy's: the simulator may have been fixed since); it crashes again here, so the totals are the same.
    policy = ReachingStub()
    assert evaluate(always, policy, specs(1, 3), FirstActionExecutor, str(path), image_size=16,
                    progress=False) == out
    assert [(r["episode"], r["attempt"]) for r in load_results(path)[4:]] == [(1, 2), (1, 3)]
    assert policy.resets == 2


def test_policy_errors_are_not_mistaken_for_sim_crashes(tmp_path):
    class Broken(ReachingStub):
        def step(self, obs):
            raise ValueError("policy bug")

    with pytest.raises(ValueError, match="policy bug"):
        evaluate(lambda: ScriptedStandInEnv(), Broken(), specs(1, 1), FirstActionExecutor,
                 str(tmp_path / "r.jsonl"), progress=False)


def test_a_task_not_evaluated_is_left_out_of_the_summary(tmp_path):
    # The same rule as vitavla test's results.json: no record of task 2, no made-up rate for it.
    out = evaluate(lambda: ScriptedStandInEnv(num_task=3), ReachingStub(), specs(1, 1), FirstActionExecutor,
                   str(tmp_path / "r.jsonl"), image_size=16, progress=False)
    assert list(out["per_task"]) == [0]
    assert json.loads((tmp_path / "r.jsonl").read_text())["task_name"] == "reach_top_left"
    assert out["success_rate"] == 1.0
