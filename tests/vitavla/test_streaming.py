import pytest
import torch

from tests.conftest import tiny_policy, window
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


def _rows(w, t, rows):
    return Observation(images=w.images[rows, t], state=w.state[rows, t],
                       instruction=[w.instruction[r] for r in rows])


@pytest.mark.parametrize("family,per_step", [("internvl", False), ("llava", True)])
def test_select_keeps_rows_exactly_as_if_only_they_had_run(family, per_step):
    # max_steps=4, refill_block=2: steps after the select cross window refills, which rebuild the cache
    # from the selected history blocks and text embeddings.
    policy = tiny_policy(family, instruction_per_step=per_step, max_steps=4)
    w = window(num_steps=8, batch_size=3, instructions=("push the blue block to the left", "open",
                                                       "close the top drawer"))
    both, alone = StreamingPolicy(policy, refill_block=2), StreamingPolicy(policy, refill_block=2)
    keep = [2, 0]
    with torch.no_grad():
        for t in range(3):
            both.step(_obs(w, t))
            alone.step(_rows(w, t, keep))
        both.select(keep)
        assert both._instruction == [w.instruction[r] for r in keep]
        for t in range(3, 8):
            got, want = both.step(_rows(w, t, keep)), alone.step(_rows(w, t, keep))
            assert got.arm.shape[0] == 2
            assert torch.allclose(got.arm, want.arm, atol=1e-4), (t, (got.arm - want.arm).abs().max())
            assert torch.allclose(got.gripper_logit, want.gripper_logit, atol=1e-4)
        assert both.refills == alone.refills > 0
        both.select([1])  # down to one row, then the other row's order must have been kept
        single = StreamingPolicy(policy, refill_block=2)
        for t in range(8):
            single.step(_rows(w, t, [0]))
        # After 8 steps both hold the same window, so one more step must agree too.
        w2 = window(num_steps=1, batch_size=3, seed=1, instructions=w.instruction)
        got = both.step(_rows(w2, 0, [0]))
        want = single.step(_rows(w2, 0, [0]))
        assert torch.allclose(got.arm, want.arm, atol=1e-4)


def test_select_rejects_bad_rows_and_is_a_noop_before_the_first_step():
    stream = StreamingPolicy(tiny_policy("internvl"))
    stream.select([5])  # nothing to select yet
    w = window(num_steps=1, batch_size=2)
    with torch.no_grad():
        stream.step(_obs(w, 0))
    for bad in ([], [0, 0], [2], [-1]):
        with pytest.raises(ValueError, match="distinct row indices"):
            stream.select(bad)
    assert stream.image_size == 224 and stream.robot.arm_dim == 6
