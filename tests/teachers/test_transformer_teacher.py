"""TransformerTeacher: the Teacher contract, step causality, checkpoints, and that it can learn."""

from __future__ import annotations

import pytest
import torch

from teachers.base import Teacher
from teachers.transformer_teacher import TransformerTeacher
from vitavla.checkpoint_io import CheckpointMismatchError
from vitavla.batch import BatchError, fake_window

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 32  # small images keep every test well under a second on CPU



def _teacher(**kw) -> TransformerTeacher:
    kw.setdefault("image_size", IMG)
    return TransformerTeacher(**kw)


@pytest.mark.parametrize("arm,grip,gripper_state", [(6, 1, "binary"), (12, 2, "binary"), (6, 1, "width")])
def test_shapes(arm, grip, gripper_state):
    t = _teacher(hidden_size=32, num_heads=4, arm_dim=arm, gripper_dim=grip, gripper_state=gripper_state)
    w = fake_window(t.robot, batch_size=3, num_steps=5, image_size=IMG)
    hidden = t.encode(w)
    assert hidden.shape == (3, 5, t.num_action_queries, t.hidden_size) == (3, 5, 3, 32)
    out = t.predict(w)
    assert out.arm.shape == (3, 5, 3, arm) and out.gripper_logit.shape == (3, 5, 3, grip)
    assert out.arm.abs().max() <= 1.0
    loss, parts = t.training_loss(w)
    assert loss.ndim == 0 and torch.isfinite(loss) and set(parts) == {"arm_mae", "gripper_bce"}


def test_rejects_malformed_window():
    t = _teacher(max_steps=4)
    with pytest.raises(BatchError, match="expects 32x32"):
        t.encode(fake_window(t.robot, image_size=64))
    with pytest.raises(BatchError, match="at most 4"):
        t.encode(fake_window(t.robot, num_steps=5, image_size=IMG))


def test_step_causality():
    t = _teacher().eval()
    w = fake_window(t.robot, batch_size=2, num_steps=6, image_size=IMG)
    base = t.encode(w)
    g = torch.Generator().manual_seed(1)
    for cut in (0, 2, 4):
        future = fake_window(t.robot, batch_size=2, num_steps=6, image_size=IMG, generator=g)
        w2 = fake_window(t.robot, batch_size=2, num_steps=6, image_size=IMG)
        w2.images[:, cut + 1:] = future.images[:, cut + 1:]
        w2.state[:, cut + 1:] = future.state[:, cut + 1:]
        out = t.encode(w2)
        torch.testing.assert_close(out[:, : cut + 1], base[:, : cut + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, cut + 1:], base[:, cut + 1:], atol=1e-4), "later steps ignore frames"


def test_every_input_matters():
    t = _teacher().eval()
    w = fake_window(t.robot, batch_size=2, num_steps=3, image_size=IMG)
    base = t.encode(w)
    for change in ("view0", "view1", "state", "instruction"):
        w2 = fake_window(t.robot, batch_size=2, num_steps=3, image_size=IMG)
        if change.startswith("view"):
            v = int(change[-1])
            w2.images[:, :, v] = 255 - w2.images[:, :, v]
        elif change == "state":
            w2.state[..., : t.robot.arm_dim] += 1.0
        else:
            w2.instruction = ["stack the blue cup", "close the drawer"]
        assert not torch.allclose(t.encode(w2), base, atol=1e-4), f"{change} does not affect the output"


def test_construction_is_seeded_and_leaves_global_rng_alone():
    rng = torch.random.get_rng_state()
    a, b, c = _teacher(seed=3), _teacher(seed=3), _teacher(seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_round_trip(tmp_path):
    src = _teacher(seed=1).eval()
    w = fake_window(src.robot, image_size=IMG)
    expected = src.encode(w)
    for target in (tmp_path / "teacher.safetensors", tmp_path / "as_dir"):
        path = src.save_pretrained(target)
        assert path.suffix == ".safetensors" and path.is_file()
        loaded = _teacher(seed=2, checkpoint=str(target)).eval()
        torch.testing.assert_close(loaded.encode(w), expected, atol=0, rtol=0)


def test_loads_lightning_checkpoint_with_prefix(tmp_path):
    src = _teacher(seed=1).eval()
    other = {"student.backbone.weight": torch.zeros(3),
             "student.action_head.action_decoder.0.weight": torch.zeros(1)}
    state = {**other, **{f"teacher.{k}": v for k, v in src.state_dict().items()}}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, tmp_path / "last.ckpt")
    loaded = _teacher(seed=2, checkpoint=str(tmp_path / "last.ckpt")).eval()
    w = fake_window(src.robot, image_size=IMG)
    torch.testing.assert_close(loaded.encode(w), src.encode(w), atol=0, rtol=0)


def test_bad_checkpoint_lists_every_problem(tmp_path):
    small = _teacher(hidden_size=32)
    path = small.save_pretrained(tmp_path / "small.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        _teacher(hidden_size=64, checkpoint=str(path))
    msg = str(err.value)
    assert "shape mismatches" in msg and "final_norm.weight: expected (64,), found (32,)" in msg
    assert "hidden_size=(32, 64)" in msg

    state = _teacher().state_dict()
    state.pop("action_queries")
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        _teacher(checkpoint=str(tmp_path / "broken.pt"))
    msg = str(err.value)
    assert "missing keys (1): action_queries" in msg and "unexpected keys (1): extra.weight" in msg

    pickled = {"state_dict": {"a": torch.zeros(1)}, "callbacks": [torch.nn.Linear(1, 1)]}
    torch.save(pickled, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        _teacher(checkpoint=str(tmp_path / "pickled.ckpt"))

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _teacher(checkpoint=str(tmp_path / "nope.safetensors"))


def test_freeze():
    t = _teacher().freeze()
    t.train()
    assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_swappable_by_class_path():
    """The YAML path: jsonargparse builds the teacher from a class_path and plain init_args."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--teacher", type=Teacher)
    cfg = parser.parse_args(["--teacher", '{"class_path": "teachers.transformer_teacher.TransformerTeacher",'
                                          ' "init_args": {"hidden_size": 32, "image_size": 32, "arm_dim": 12,'
                                          ' "gripper_dim": 2}}'])
    teacher = parser.instantiate_classes(cfg).teacher
    assert isinstance(teacher, TransformerTeacher) and teacher.robot.action_dim == 14


def test_training_loss_falls_on_a_fixed_window():
    t = _teacher(seed=0)
    w = fake_window(t.robot, batch_size=2, num_steps=4, image_size=IMG)
    opt = torch.optim.Adam(t.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss, _ = t.training_loss(w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] * 5 <= losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
