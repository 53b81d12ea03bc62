"""One rollout-policy protocol: what each closed loop accepts, what it wraps, and what it refuses (and how)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_policy
from vitavla.action_head import ActionOutput
from vitavla.policy_protocol import as_rollout_policy, check_rollout_policy
from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.executors import FirstActionExecutor
from vitavla.rollout.runner import EpisodeSpec, evaluate
from vitavla.streaming import StreamingPolicy

ROOT = Path(__file__).resolve().parents[2]


class StepOnly:
    """A scripted policy for one episode at a time: no select, no image_size/robot."""

    def reset(self):
        pass

    def step(self, obs):
        b = obs.state.shape[0]
        return ActionOutput(torch.zeros(b, 1, 6), torch.zeros(b, 1, 1))


class NoStep:
    def reset(self):
        pass

    step = "not callable"


def test_a_vla_policy_is_streamed_and_rollout_policies_pass_through_unchanged():
    vla = tiny_policy()
    streamed = as_rollout_policy(vla, batched=True, described=True)
    assert isinstance(streamed, StreamingPolicy) and streamed.policy is vla
    assert as_rollout_policy(streamed, batched=True, described=True) is streamed
    scripted = StepOnly()
    assert as_rollout_policy(scripted) is scripted


@pytest.mark.parametrize("policy,kw,missing", [
    (object(), {}, "reset, step"),
    (NoStep(), {}, "step"),
    (StepOnly(), {"batched": True}, "select"),
    (StepOnly(), {"described": True}, "image_size, robot"),
])
def test_what_is_missing_is_named_with_the_protocol(policy, kw, missing):
    with pytest.raises(TypeError, match=rf"lacks {missing}\. A rollout policy \(vitavla.policy_protocol."
                                        r"RolloutPolicy\) has reset\(\) and step"):
        check_rollout_policy(policy, **kw)
    with pytest.raises(TypeError, match=r"MyModule.rollout_policy\(\) \(\w+\) is not a rollout policy"):
        as_rollout_policy(policy, source="MyModule.rollout_policy()", **kw)


def test_a_batched_evaluation_refuses_a_policy_without_select_before_any_simulator_starts(tmp_path):
    built = []

    def factory():
        built.append(1)
        return ScriptedStandInEnv(steps=2)

    with pytest.raises(TypeError, match="lacks select"):
        evaluate(factory, StepOnly(), [EpisodeSpec(0, 0), EpisodeSpec(0, 1)], FirstActionExecutor,
                 str(tmp_path / "r.jsonl"), num_envs=2, progress=False)
    assert built == [] and not (tmp_path / "r.jsonl").exists()
    # One episode at a time needs no select: the same policy runs.
    res = evaluate(factory, StepOnly(), [EpisodeSpec(0, 0)], FirstActionExecutor, str(tmp_path / "r.jsonl"),
                   image_size=16, progress=False)
    assert res["episodes"] == 1


def test_the_lightning_callback_checks_through_the_same_protocol():
    from vitavla.rollout.lightning import RolloutTestCallback

    class Described(StepOnly):
        image_size, robot = 16, object()

    class Hooked:
        def rollout_policy(self):
            return Described()

    assert isinstance(RolloutTestCallback._policy(Hooked()), Described)
    with pytest.raises(TypeError, match=r"Hooked.rollout_policy\(\) \(Described\) .* lacks select"):
        RolloutTestCallback._policy(Hooked(), batched=True)

    class Plain:  # no hook: its VLAPolicy is streamed
        policy = tiny_policy()

    assert isinstance(RolloutTestCallback._policy(Plain(), batched=True), StreamingPolicy)
    with pytest.raises(TypeError, match="neither rollout_policy"):
        RolloutTestCallback._policy(object())


def test_the_protocol_module_and_scripted_policies_stay_off_the_student_stack():
    # The protocol sits with the core types: importing it and passing a scripted policy through it must not
    # load the student (transformers) or any layer above the core.
    code = ("import sys; from vitavla.policy_protocol import as_rollout_policy\n"
            "class P:\n def reset(self): pass\n def step(self, obs): pass\n"
            "as_rollout_policy(P())\n"
            "print(sorted(m for m in ('torch', 'vitavla.policy', 'vitavla.streaming', 'vitavla.rollout', "
            "'lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
