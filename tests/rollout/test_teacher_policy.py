import pytest
import torch

from teachers import SeerTeacher
from vitavla.batch import BatchError, Window
from vitavla.rollout.teacher_policy import WindowedTeacherPolicy
from vitavla.streaming import Observation

SIZE = 64


@pytest.fixture(scope="module")
def teacher():
    return SeerTeacher(preset="tiny", overrides={"image_size": SIZE, "sequence_length": 4}).eval()


def _obs(gen: torch.Generator, b: int, teacher) -> Observation:
    images = torch.randint(0, 256, (b, 2, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    state = torch.rand(b, teacher.robot.state_dim, generator=gen)
    return Observation(images, state, [f"task {i}" for i in range(b)])


def _reference(teacher, seen: list[Observation], rows: list[int] | None = None):
    """The teacher's own forward over the last `sequence_length` observations, newest step's actions."""
    seen = seen[-teacher.max_steps:]
    rows = rows if rows is not None else list(range(seen[0].images.shape[0]))
    images = torch.stack([o.images[rows] for o in seen], dim=1)
    state = torch.stack([o.state[rows] for o in seen], dim=1)
    window = Window(images=images, instruction=[seen[0].instruction[r] for r in rows], state=state,
                    valid=torch.ones(images.shape[:2], dtype=torch.bool))
    with torch.no_grad():
        out = teacher.predict(window)
    return out.arm[:, -1], out.gripper_logit[:, -1]


def test_steps_match_the_teacher_over_a_sliding_window(teacher, one_thread):
    gen = torch.Generator().manual_seed(0)
    policy = WindowedTeacherPolicy(teacher)
    seen = []
    for _ in range(teacher.max_steps + 2):  # past the history: the window slides
        seen.append(_obs(gen, 2, teacher))
        out = policy.step(seen[-1])
        arm, grip = _reference(teacher, seen)
        assert out.arm.shape == (2, teacher.robot.action_chunk, teacher.robot.arm_dim)
        torch.testing.assert_close(out.arm, arm)
        torch.testing.assert_close(out.gripper_logit, grip)
    assert policy.held_steps == teacher.max_steps


def test_select_keeps_the_history_of_the_remaining_rows(teacher, one_thread):
    gen = torch.Generator().manual_seed(1)
    policy = WindowedTeacherPolicy(teacher)
    seen = [_obs(gen, 3, teacher) for _ in range(2)]
    for o in seen:
        policy.step(o)
    policy.select([2, 0])
    nxt = _obs(gen, 3, teacher)
    kept = Observation(nxt.images[[2, 0]], nxt.state[[2, 0]], [nxt.instruction[2], nxt.instruction[0]])
    out = policy.step(kept)
    arm, grip = _reference(teacher, seen + [nxt], rows=[2, 0])
    torch.testing.assert_close(out.arm, arm)
    torch.testing.assert_close(out.gripper_logit, grip)


def test_misuse_is_reported(teacher):
    gen = torch.Generator().manual_seed(2)
    policy = WindowedTeacherPolicy(teacher)
    policy.step(_obs(gen, 2, teacher))
    with pytest.raises(BatchError, match="select"):
        policy.step(_obs(gen, 1, teacher))
    other = _obs(gen, 2, teacher)
    other.instruction[0] = "something else"
    with pytest.raises(BatchError, match="instruction changed"):
        policy.step(other)
    with pytest.raises(ValueError, match="exceeds"):
        WindowedTeacherPolicy(teacher, history=teacher.max_steps + 1)
