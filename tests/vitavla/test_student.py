import pytest
import torch

from tests.conftest import tiny_policy, window
from vitavla.batch import BatchError, RobotSpec


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("internvl")


def test_forward_shapes(policy):
    w = window(num_steps=3)
    hidden = policy.student(w)
    assert hidden.shape == (2, 3, 3, policy.student.hidden_size)
    out = policy(w)
    assert out.arm.shape == (2, 3, 3, 6) and out.gripper_logit.shape == (2, 3, 3, 1)
    assert out.arm.abs().max() <= 1


@pytest.mark.parametrize("per_step", [True, False])
def test_outputs_at_step_t_ignore_later_steps(per_step):
    policy = tiny_policy("internvl", instruction_per_step=per_step)
    w = window(num_steps=5)
    changed = window(num_steps=5, seed=1)
    changed.images[:, :3] = w.images[:, :3]
    changed.state[:, :3] = w.state[:, :3]
    changed.instruction = w.instruction
    with torch.no_grad():
        a, b = policy.student(w), policy.student(changed)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)


def test_plain_causal_mode_lets_later_tokens_see_action_tokens():
    isolated = tiny_policy("internvl")
    causal = tiny_policy("internvl", attention="causal")
    causal.load_state_dict(isolated.state_dict())
    w = window(num_steps=2)
    with torch.no_grad():
        first_step_equal = torch.allclose(isolated.student(w)[:, 0], causal.student(w)[:, 0], atol=1e-6)
        second_step_equal = torch.allclose(isolated.student(w)[:, 1], causal.student(w)[:, 1], atol=1e-4)
    assert not first_step_equal or not second_step_equal


def test_a_sample_does_not_depend_on_its_batch_mates(policy):
    w = window(num_steps=2, batch_size=2,
               instructions=("push", "pick up the red block and place it in the drawer"))
    single = window(num_steps=2, batch_size=1, instructions=("push",))
    single.images, single.state = w.images[:1], w.state[:1]
    with torch.no_grad():
        assert torch.allclose(policy.student(w)[:1], policy.student(single), atol=1e-5)


def test_bad_window_is_rejected_with_the_field_name(policy):
    w = window(num_steps=2)
    w.images = w.images.float()
    with pytest.raises(BatchError, match="uint8"):
        policy.student(w)
    w = window(num_steps=2, robot=RobotSpec(arm_dim=12, gripper_dim=2))
    with pytest.raises(BatchError, match="Window.state has shape"):
        policy.student(w)
    w = window(num_steps=11)
    with pytest.raises(BatchError, match="at most 10"):
        policy.student(w)


def test_bimanual_dims_come_from_config():
    policy = tiny_policy("internvl", arm_dim=12, gripper_dim=2, gripper_state="width")
    robot = policy.student.robot
    assert robot.state_dim == 16 and robot.action_dim == 14
    out = policy(window(robot=robot, num_steps=2))
    assert out.arm.shape[-1] == 12 and out.gripper_logit.shape[-1] == 2
