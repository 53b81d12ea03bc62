import pytest
import torch

from tests.vitavla.helpers import tiny_policy, window
from vitavla.streaming import Observation, StreamingPolicy


def _obs(w, t):
    return Observation(images=w.images[:, t], state=w.state[:, t], instruction=w.instruction)


def _full(policy, w, start, stop):
    out = policy(w.slice_steps(start, stop))
    return out.arm[:, -1], out.gripper_logit[:, -1]


@pytest.mark.parametrize("family", ["internvl", "llava"])
@pytest.mark.parametrize("per_step", [True, False])
def test_streaming_equals_full_window_at_every_step(family, per_step):
    policy = tiny_policy(family, instruction_per_step=per_step)
    w = window(num_steps=10, batch_size=2, instructions=("push the blue block", "open the drawer"))
    stream = StreamingPolicy(policy)
    with torch.no_grad():
        for t in range(10):
            got = stream.step(_obs(w, t))
            arm, grip = _full(policy, w, 0, t + 1)
            assert torch.allclose(got.arm, arm, atol=1e-4), (t, (got.arm - arm).abs().max())
            assert torch.allclose(got.gripper_logit, grip, atol=1e-4)
    assert stream.refills == 0


def test_cache_holds_only_observation_tokens():
    policy = tiny_policy("internvl")
    stream = StreamingPolicy(policy)
    w = window(num_steps=3, batch_size=1, instructions=("push",))
    with torch.no_grad():
        for t in range(3):
            stream.step(_obs(w, t))
    per_step = 2 * policy.student.backbone.tokens_per_image + 1 + 1  # views + "push" + state
    n_text = len(policy.student.instruction_tokens(["push"])[0][0])
    assert stream.cached_tokens == 3 * (per_step - 1 + n_text)


def test_overflow_refills_from_recent_steps_and_matches_full_forward_over_held_steps():
    policy = tiny_policy("internvl", max_steps=4)
    stream = StreamingPolicy(policy, refill_block=2)
    w = window(num_steps=10, batch_size=1, instructions=("open the drawer",))
    held = []
    with torch.no_grad():
        for t in range(10):
            got = stream.step(_obs(w, t))
            start = t + 1 - stream.held_steps
            held.append(stream.held_steps)
            arm, _ = _full(policy, w, start, t + 1)
            assert torch.allclose(got.arm, arm, atol=1e-4), (t, start)
    assert max(held) == 4 and min(held[4:]) == 3 and stream.refills == 3


def test_causal_ablation_streams_too():
    policy = tiny_policy("internvl", attention="causal")
    stream = StreamingPolicy(policy)
    w = window(num_steps=4, batch_size=1)
    with torch.no_grad():
        for t in range(4):
            got = stream.step(_obs(w, t))
            arm, _ = _full(policy, w, 0, t + 1)
            assert torch.allclose(got.arm, arm, atol=1e-4)
