"""Teacher training: Seer's objective piece by piece, TeacherModule, the export round trip and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from cli import main
from teachers import SeerTeacher, TransformerTeacher
from teachers.seer import CheckpointMismatchError
from teachers.seer.training import (
    SeerObjective,
    augment_views,
    draw_shifts,
    foresight_loss,
    foresight_targets,
    normalize_patches,
    patchify,
    random_shift,
    seer_training_loss,
)
from vitavla.batch import fake_window
from vitavla.losses import action_metrics
from vitavla.modules import OptimConfig, TeacherModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# 96 px images (9 patches of 32 px) keep the trained tests fast on a shared CPU.
SMALL = {"image_size": 96}
# Seer with S = 4 model steps: its training windows are S + future_steps = 7 frames.
SHORT = {**SMALL, "sequence_length": 4}


def smooth_window(robot, batch_size=2, num_steps=6, image_size=96):
    """A window whose static scenes (one low-frequency pattern per episode and view) make foresight learnable."""
    w = fake_window(robot, batch_size=batch_size, num_steps=num_steps, image_size=image_size)
    b, t, v, c, h, ww = w.images.shape
    g = torch.Generator().manual_seed(3)
    y, x = torch.arange(h).view(h, 1).float(), torch.arange(ww).view(1, ww).float()
    phase = torch.rand(b, 1, v, c, 1, 1, generator=g) * 2 * math.pi
    img = 128 + 100 * torch.sin(2 * math.pi * (1.5 * x + y) / ww + phase)
    w.images = img.expand(b, t, v, c, h, ww).round().clamp(0, 255).to(torch.uint8).contiguous()
    return w


# ---------------------------------------------------------------- pieces of the objective


def test_patchify_order_is_h_w_p_q_c():
    img = torch.randn(2, 3, 8, 12)
    patches = patchify(img, 4)
    assert patches.shape == (2, 6, 48)
    for n, h, w, p, q, c in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 2), (0, 1, 0, 2, 3, 1)]:
        assert patches[n, h * 3 + w, (p * 4 + q) * 3 + c] == img[n, c, h * 4 + p, w * 4 + q]
    with pytest.raises(ValueError, match="not a multiple of patch_size 5"):
        patchify(img, 5)


def test_patch_normalisation_matches_mae_norm_pix():
    patches = torch.randn(3, 5, 48, dtype=torch.float64) * 3 + 1
    got = normalize_patches(patches)
    x = patches.numpy()
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    flat = normalize_patches(torch.full((1, 1, 12), 7.0))  # a constant patch has no variance: all zero
    assert torch.equal(flat, torch.zeros_like(flat))


def test_random_shift_crops_the_replicate_padded_image_at_the_offsets():
    img = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    offsets = torch.tensor([[1, 4], [2, 2]])  # (x, y) into the image padded by 2
    out = random_shift(img, 2, offsets)
    padded = F.pad(img, (2, 2, 2, 2), mode="replicate")
    torch.testing.assert_close(out[0], padded[0, :, 4:10, 1:7], rtol=0, atol=0)
    torch.testing.assert_close(out[1], img[1], rtol=0, atol=0)  # offset == pad: the unshifted crop
    # Content moves up by 2 and right by 1: the last two rows repeat the bottom row and the first column
    # repeats the left edge (replicate padding, never zeros).
    assert torch.equal(out[0, :, :4, 1:], img[0, :, 2:, :5])
    assert torch.equal(out[0, :, 4:, 1:], img[0, :, 5:, :5].expand(3, 2, 5))
    assert torch.equal(out[0, :, :4, 0], img[0, :, 2:, 0])
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 4\]"):
        random_shift(img, 2, torch.tensor([[0, 5], [1, 1]]))


def test_shift_offsets_are_in_one_to_two_pad_and_views_get_their_own_pad():
    offsets = draw_shifts(4000, 3, generator=torch.Generator().manual_seed(0))
    assert offsets.min() == 1 and offsets.max() == 6  # never 0, as Seer's forward_traj
    assert len(torch.unique(offsets[:, 0] * 10 + offsets[:, 1])) == 36  # x and y drawn independently
    assert SeerObjective().pads(224) == (10, 4) and SeerObjective().pads(112) == (5, 2)
    images = torch.randn(2, 3, 2, 3, 32, 32)
    shifted, drawn = augment_views(images, (10, 4), generator=torch.Generator().manual_seed(1))
    assert [d.shape for d in drawn] == [(6, 2), (6, 2)] and drawn[1].max() <= 8
    for view, pad in enumerate((10, 4)):
        frames = images[:, :, view].flatten(0, 1)
        want = random_shift(frames, pad, drawn[view]).unflatten(0, (2, 3))
        assert torch.equal(shifted[:, :, view], want)


def test_foresight_loss_targets_frame_t_plus_3_and_skips_steps_without_one():
    b, t, patch = 2, 6, 8
    images = torch.randn(b, t, 2, 3, 16, 16)
    targets = normalize_patches(patchify(images.flatten(0, 2), patch)).unflatten(0, (b, t, 2))
    pred = torch.randn(b, t, 2, 4, 3 * patch * patch)
    pred[:, :3] = targets[:, 3:]  # steps 0..2 predict frames 3..5 exactly; steps 3..5 have no target frame
    valid = torch.ones(b, t, dtype=torch.bool)
    assert foresight_loss(pred, images, valid, patch) == 0
    pred[0, 1] += 1.0
    want = 0.5 * (1.0 + 1.0) / (b * 3)  # per-camera MSE 1 at one of the b * 3 counted steps
    torch.testing.assert_close(foresight_loss(pred, images, valid, patch), torch.tensor(want))
    valid[0, 4] = False  # step 1's target frame is padding: that step no longer counts
    assert foresight_loss(pred, images, valid, patch) == 0
    short = pred[:, :3].clone().requires_grad_(True)  # no step has a t+3 frame: zero, still differentiable
    loss = foresight_loss(short, images[:, :3], valid[:, :3], patch)
    loss.backward()
    assert loss == 0 and torch.equal(short.grad, torch.zeros_like(short))


def test_seer_training_loss_parts_and_modes(one_thread):
    teacher = SeerTeacher("tiny", overrides=SMALL)
    window = fake_window(teacher.robot, batch_size=2, num_steps=5, image_size=96)
    window.actions[..., 6] = (window.actions[..., 6] > 0.5).float()
    teacher.eval()
    total, parts = teacher.training_loss(window)
    assert set(parts) == {"arm", "gripper", "image"} and all(torch.isfinite(v) for v in parts.values())
    out = teacher.predict(window)
    arm = F.smooth_l1_loss(out.arm, window.actions[..., :6])
    grip = F.binary_cross_entropy(out.gripper_prob, window.actions[..., 6:])
    torch.testing.assert_close(parts["arm"], arm.detach())
    torch.testing.assert_close(parts["gripper"], grip.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), parts["arm"] + 0.01 * parts["gripper"] + 0.1 * parts["image"])
    assert torch.equal(teacher.training_loss(window)[0], total)  # eval: no augmentation, no dropout
    teacher.train()
    assert not torch.equal(teacher.training_loss(window)[0], total)
    window.action_valid[:, -1] = False  # padded chunk entries are left out of the action terms
    window.actions[:, -1] = 5.0
    teacher.eval()
    assert teacher.training_loss(window)[1]["arm"] < 1.0


def test_foresight_loss_with_trailing_frames_gives_every_step_its_target():
    b, s, f, patch = 2, 4, 3, 8
    images = torch.randn(b, s + f, 2, 3, 16, 16)
    targets = normalize_patches(patchify(images.flatten(0, 2), patch)).unflatten(0, (b, s + f, 2))
    pred = targets[:, f:].clone()  # all 4 model steps predict frames 3..6 exactly
    valid = torch.ones(b, s + f, dtype=torch.bool)
    assert foresight_loss(pred, images, valid, patch) == 0
    pred[1, 3] += 1.0  # the last model step counts too: its target is the trailing frame 6
    torch.testing.assert_close(foresight_loss(pred, images, valid, patch), torch.tensor(1.0 / (b * s)))
    valid[1, 6] = False  # its target frame is padding: it no longer counts
    assert foresight_loss(pred, images, valid, patch) == 0
    with pytest.raises(ValueError, match="more predicted steps than frames"):
        foresight_loss(pred, images[:, :3], valid[:, :3], patch)


def _seer_loss_by_hand(out, window, images, s, f=3, patch=32, valid=None):
    """Seer's three terms written out: actions on steps [0, s), image targets = frames t + f of ``images``."""
    seen = window.slice_steps(0, s)
    arm = F.smooth_l1_loss(out.arm, seen.actions[..., :6])
    grip = F.binary_cross_entropy_with_logits(out.gripper_logit, seen.actions[..., 6:])
    pred = out.image_pred.unflatten(0, (window.batch_size, s))
    err = ((pred - foresight_targets(images[:, f:f + s], patch)) ** 2).mean(dim=(2, 3, 4))  # (B, s)
    mask = torch.ones_like(err, dtype=torch.bool) if valid is None else valid[:, :s] & valid[:, f:f + s]
    return arm, grip, err[mask].mean()


def test_seer_window_of_s_plus_future_steps_covers_every_step(one_thread):
    teacher = SeerTeacher("tiny", overrides=SHORT).eval()
    s, f = teacher.max_steps, teacher.objective.future_steps
    assert (s, f) == (4, 3)
    window = fake_window(teacher.robot, batch_size=2, num_steps=s + f, image_size=96)
    window.valid[0, 5:] = False  # episode 0 ends after frame 4: steps 2 and 3 of it have no real target
    window.action_valid[0] = (torch.arange(s + f)[:, None] + torch.arange(3)) < 5  # labels past the end
    seen = window.slice_steps(0, s)
    with torch.no_grad():
        total, parts = teacher.training_loss(window)
        out = teacher(seen, predict_images=True)
        arm, grip, image = _seer_loss_by_hand(out, window, teacher.normalize_images(window.images), s,
                                              valid=window.valid)
        alone = seer_training_loss(teacher, seen)[1]  # the first S steps alone: targets only inside them
    torch.testing.assert_close(parts["image"], image)
    # The action terms are those of the S steps the model reads (their labels and masks), nothing else.
    torch.testing.assert_close(parts["arm"], alone["arm"], rtol=0, atol=0)
    torch.testing.assert_close(parts["gripper"], alone["gripper"], rtol=0, atol=0)
    window.action_valid[0] = True
    with torch.no_grad():
        full = teacher.training_loss(window)[1]
    torch.testing.assert_close(full["arm"], arm)
    torch.testing.assert_close(full["gripper"], grip, rtol=1e-5, atol=1e-6)
    assert not torch.equal(parts["image"], alone["image"])  # in-window targets cover step 0 only
    torch.testing.assert_close(total, parts["arm"] + 0.01 * parts["gripper"] + 0.1 * parts["image"])


def test_seer_training_shift_is_drawn_once_for_model_frames_and_targets(one_thread, monkeypatch):
    teacher = SeerTeacher("tiny", overrides=SHORT).train()
    s = teacher.max_steps
    window = fake_window(teacher.robot, batch_size=2, num_steps=s + 3, image_size=96)
    calls = []
    run = teacher.run

    def recording_run(w, images, predict_images=False):
        out = run(w, images, predict_images)
        calls.append((w, images, out))
        return out

    monkeypatch.setattr(teacher, "run", recording_run)
    torch.manual_seed(5)
    _, parts = teacher.training_loss(window)
    torch.manual_seed(5)  # the same draw, over all 7 frames at once
    shifted, _ = augment_views(teacher.normalize_images(window.images), teacher.objective.pads(96))
    (seen, images, out), = calls
    assert seen.num_steps == s and seen.actions.shape[1] == s
    assert torch.equal(images, shifted[:, :s])  # the model reads the first S shifted frames
    _, _, image = _seer_loss_by_hand(out, window, shifted, s)  # and predicts shifted frames 3..6
    torch.testing.assert_close(parts["image"], image.detach())


def test_one_step_seer_reads_frame_0_predicts_frame_3_and_never_touches_frames_1_and_2(one_thread, monkeypatch):
    """S = 1 (the quickstart's teacher): of a 4-frame window only frames 0 and 3 are shifted and normalised,
    and the loss equals the whole window's."""
    teacher = SeerTeacher("tiny", overrides={**SMALL, "sequence_length": 1}).eval()
    window = fake_window(teacher.robot, batch_size=3, num_steps=4, image_size=96)
    window.valid[1, 3:] = False  # episode 1 ends at frame 2: step 0 has no target there
    seen = window.slice_steps(0, 1)
    with torch.no_grad():
        total, parts = teacher.training_loss(window)
        out = teacher(seen, predict_images=True)
        arm, grip, image = _seer_loss_by_hand(out, window, teacher.normalize_images(window.images), 1,
                                              valid=window.valid)
    torch.testing.assert_close(parts["image"], image)
    torch.testing.assert_close(parts["arm"], arm)
    # Training mode: the shift sees frames 0 and 3 only (2 frames per view), whatever frames 1-2 hold...
    shifted = []
    real = random_shift

    def spy(images, pad, offsets):
        shifted.append(images.clone())
        return real(images, pad, offsets)

    monkeypatch.setattr("teachers.seer.training.random_shift", spy)
    teacher.train()
    window.images[:, 1:3] = 0
    teacher.training_loss(window)
    views = [window.images[:, [0, 3], v].flatten(0, 1) for v in range(window.images.shape[2])]
    assert len(shifted) == len(views) and all(torch.equal(a, b) for a, b in zip(shifted, views))
    # ... with the offsets the whole window's shift would give them: a seeded run is unchanged by this.
    pads = teacher.objective.pads(96)
    full, _ = augment_views(window.images, pads, torch.Generator().manual_seed(3))
    part, _ = augment_views(window.images, pads, torch.Generator().manual_seed(3), frames=[0, 3])
    assert torch.equal(part, full[:, [0, 3]]) and not torch.equal(part, full[:, :2])


def test_zero_foresight_weight_skips_the_image_decoder_and_keeps_the_action_terms(one_thread, monkeypatch):
    """image_weight 0 (the quickstart's teacher): the foresight head never runs and gets no gradient, the random
    shift touches only the frames the model reads, and the action terms equal those of the full objective
    under the same seed (the shift offsets are drawn for the whole window either way)."""
    overrides = {**SMALL, "sequence_length": 1}
    full = SeerTeacher("tiny", overrides=overrides, objective=SeerObjective(gripper_weight=1.0))
    cut = SeerTeacher("tiny", overrides=overrides, objective=SeerObjective(gripper_weight=1.0, image_weight=0.0))
    cut.load_state_dict(full.state_dict())
    window = fake_window(full.robot, batch_size=3, num_steps=4, image_size=96)
    window.actions[..., 6] = (window.actions[..., 6] > 0.5).float()
    decoded = []
    monkeypatch.setattr(cut.model, "decode_images", lambda h: decoded.append(h) or None)
    torch.manual_seed(5)
    total_full, parts_full = full.training_loss(window)
    shifted = []
    real = random_shift

    def spy(images, pad, offsets):
        shifted.append(images.shape[0])
        return real(images, pad, offsets)

    monkeypatch.setattr("teachers.seer.training.random_shift", spy)
    torch.manual_seed(5)
    total, parts = cut.training_loss(window)
    assert decoded == [] and shifted == [3, 3]  # one frame of each of 3 windows, per view
    assert parts_full["image"] > 0 and parts["image"] == 0
    assert torch.equal(parts["arm"], parts_full["arm"]) and torch.equal(parts["gripper"], parts_full["gripper"])
    torch.testing.assert_close(total, parts["arm"] + parts["gripper"])
    total.backward()
    decoder = [p.grad for n, p in cut.model.named_parameters() if n.startswith("image_decoder")]
    assert decoder and all(g is None for g in decoder)
    assert cut.model.action_head.parameters().__next__().grad is not None


@pytest.mark.parametrize("steps", [5, 6, 8])
def test_seer_training_window_of_another_length_is_an_error(steps):
    teacher = SeerTeacher("tiny", overrides=SHORT)
    window = fake_window(teacher.robot, batch_size=1, num_steps=steps, image_size=96)
    with pytest.raises(ValueError, match=rf"has {steps} steps.*sequence_length=4 and future_steps=3.*"
                                         r"at most 4 steps.*exactly 4 \+ 3 = 7"):
        teacher.training_loss(window)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained():
    """A tiny Seer after 30 steps on one fixed batch, with its loss before and after (eval mode)."""
    # Tiny tensors: a second intra-op thread only adds synchronisation cost on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = SeerTeacher("tiny", overrides=SMALL)
    window = smooth_window(teacher.robot)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    text_before = {k: v.clone() for k, v in teacher.text_encoder.state_dict().items()}
    teacher.eval()
    with torch.no_grad():
        loss0 = teacher.training_loss(window)
    opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=3e-3, weight_decay=1e-4)
    teacher.train()
    for _ in range(30):
        opt.zero_grad()
        teacher.training_loss(window)[0].backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 0.1)
        opt.step()
    teacher.eval()
    with torch.no_grad():
        loss1 = teacher.training_loss(window)
    torch.set_num_threads(threads)
    return dict(teacher=teacher, window=window, before=before, text_before=text_before, loss0=loss0,
                loss1=loss1)


def test_training_on_a_fixed_batch_lowers_the_loss(trained):
    (l0, p0), (l1, p1) = trained["loss0"], trained["loss1"]
    assert l1 < 0.6 * l0, (l0, l1)
    assert p1["arm"] < 0.5 * p0["arm"] and p1["image"] < 0.85 * p0["image"], (p0, p1)


def test_frozen_parts_stay_frozen_and_everything_else_trains(trained):
    teacher, before = trained["teacher"], trained["before"]
    for name, p in teacher.named_parameters():
        frozen = name.startswith(("model.vision_encoder.", "text_encoder."))
        assert p.requires_grad != frozen, name
    after = teacher.state_dict()
    for key, value in before.items():
        if key.startswith("model.vision_encoder."):
            assert torch.equal(after[key], value), key
    for key, value in trained["text_before"].items():
        assert torch.equal(teacher.text_encoder.state_dict()[key], value), key
    assert torch.equal(teacher.model.image_decoder_position_embedding,
                       SeerTeacher("tiny", overrides=SMALL).model.image_decoder_position_embedding)
    for key in ("model.transformer_backbone.h.0.attn.c_attn.weight", "model.obs_tokens", "model.mask_token",
                "model.image_decoder_pred.weight", "model.arm_action_decoder.0.weight"):
        assert not torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_round_trips_into_a_fresh_seer_teacher(trained, tmp_path, suffix):
    teacher, window = trained["teacher"], trained["window"]
    path = teacher.export(tmp_path / f"teacher{suffix}")
    loaded = SeerTeacher("tiny", checkpoint=str(path), overrides=SMALL).eval()
    with torch.no_grad():
        a, b = teacher(window, predict_images=True), loaded(window, predict_images=True)
    for field in ("action_query_hidden", "arm", "gripper_logit", "image_pred"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(CheckpointMismatchError, match=r"seed=1\): the frozen vision_encoder differs.*same "
                                                      r"preset, overrides and seed"):
        SeerTeacher("tiny", checkpoint=str(path), seed=1, overrides=SMALL)
    with pytest.raises(CheckpointMismatchError, match="Seer config differs: gripper_width=False"):
        SeerTeacher("tiny", checkpoint=str(path), overrides={**SMALL, "gripper_width": True})


def test_export_is_the_official_layout(trained, tmp_path):
    path = trained["teacher"].export(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert len(keys) == 102 and all(k.startswith("module.") for k in keys)
    assert not any(k.startswith(("module.vision_encoder.", "module.clip")) for k in keys)
    assert meta["preset"] == "tiny" and meta["seed"] == "0"


def test_teacher_module_rejects_a_frozen_teacher():
    with pytest.raises(ValueError, match="was frozen"):
        TeacherModule(SeerTeacher("tiny").freeze())


def test_teacher_module_validation_uses_the_student_metrics(tmp_path, one_thread):
    import lightning as L

    from datamodules import SyntheticWindowDataModule

    data = SyntheticWindowDataModule(num_episodes=4, episode_length=6, num_steps=5, image_size=96, batch_size=8,
                                     seed=0)
    teacher = SeerTeacher("tiny", overrides=SMALL)
    module = TeacherModule(teacher, OptimConfig(lr=1e-3))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    batch = next(iter(data.val_dataloader()))
    teacher.eval()
    with torch.no_grad():
        want = action_metrics(teacher.predict(batch), batch.actions, batch.action_valid, teacher.robot)
        loss = teacher.training_loss(batch)[0]
    assert len(data.val_dataloader()) == 1
    for name in ("arm_mae", "gripper_acc", "gripper_bce"):
        assert metrics[f"val/{name}"] == pytest.approx(want[name].item(), rel=1e-5), name
    assert metrics["val/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert {"val/arm", "val/gripper", "val/image"} <= set(metrics)


def test_teacher_module_trains_and_validates_on_s_plus_future_steps_windows(tmp_path, one_thread):
    import lightning as L

    from datamodules import SyntheticWindowDataModule

    teacher = SeerTeacher("tiny", overrides=SHORT)
    data = SyntheticWindowDataModule(num_episodes=4, episode_length=8, num_steps=7, image_size=96,
                                     batch_size=8, seed=0)
    module = TeacherModule(teacher, OptimConfig(lr=1e-3), export_path=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    batch = next(iter(data.val_dataloader()))
    assert batch.num_steps == 7
    seen = batch.slice_steps(0, 4)
    teacher.eval()
    with torch.no_grad():  # metrics on the S steps the model reads; the objective on the whole window
        want = action_metrics(teacher.predict(seen), seen.actions, seen.action_valid, teacher.robot)
        loss = teacher.training_loss(batch)[0]
        predicted = module.predict_step(batch, 0)
    for name in ("arm_mae", "gripper_acc", "gripper_bce"):
        assert metrics[f"val/{name}"] == pytest.approx(want[name].item(), rel=1e-5), name
    assert metrics["val/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert predicted.shape[:2] == (batch.batch_size, 4)

    data.num_steps = 6  # neither <= S nor S + future_steps: refused before the first step
    refused = r"num_steps=6 .* at most 4 steps or exactly 4 \+ future_steps 3 = 7"
    with pytest.raises(ValueError, match=refused):
        trainer.validate(module, datamodule=data, verbose=False)


def test_transformer_teacher_trains_and_exports_through_the_default_objective(tmp_path):
    teacher = TransformerTeacher(hidden_size=32, num_layers=1, num_heads=2, max_steps=4)
    window = fake_window(teacher.robot, batch_size=2, num_steps=3)
    loss, parts = teacher.training_loss(window)
    assert set(parts) == {"arm_mae", "gripper_bce"} and torch.isfinite(loss)
    path = teacher.export(tmp_path / "tt.safetensors")
    loaded = TransformerTeacher(hidden_size=32, num_layers=1, num_heads=2, max_steps=4, seed=5,
                                checkpoint=str(path))
    assert torch.equal(loaded.eval().encode(window), teacher.eval().encode(window))


# ---------------------------------------------------------------- command line


def test_vitavla_fit_tiny_teacher_writes_a_loadable_export(tmp_path, one_thread):
    main(["fit", "--config", str(CONFIGS / "tiny_teacher.yaml"), f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
          "--data.init_args.num_episodes=4", "--data.init_args.episode_length=8"])
    exports = sorted(tmp_path.glob("version_*/teacher.safetensors"))
    assert exports, list(tmp_path.rglob("*"))
    teacher = SeerTeacher("tiny", checkpoint=str(exports[-1]))
    fresh = SeerTeacher("tiny")
    assert not torch.equal(teacher.model.obs_tokens, fresh.model.obs_tokens)  # the trained weights arrived
    last = next(tmp_path.glob("version_*/checkpoints/last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert not any(k.startswith(("teacher.model.vision_encoder.", "teacher.text_encoder.")) for k in ckpt["state_dict"])


def seer_window_rule(cfg: dict) -> tuple[int, int] | None:
    """(data num_steps, Seer sequence_length + future_steps) of a resolved Seer training config, else None."""
    from teachers.seer import SeerConfig

    teacher = cfg["model"]["init_args"]["teacher"]
    if teacher["class_path"] != "teachers.SeerTeacher":
        return None
    args = teacher["init_args"]
    preset = SeerConfig.preset(args.get("preset") or "seer_calvin", **(args.get("overrides") or {}))
    s = preset.sequence_length
    return cfg["data"]["init_args"]["num_steps"], s + 3


@pytest.mark.parametrize("name", ["tiny_teacher", "teacher_calvin", "teacher_libero", "teacher_aloha"])
def test_teacher_configs_parse_and_seer_windows_carry_the_foresight_frames(capsys, name):
    """A Seer training config cuts windows of sequence_length + future_steps (3), as Seer loads them."""
    import yaml

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    assert e.value.code in (0, None), name
    rule = seer_window_rule(yaml.safe_load(capsys.readouterr().out))
    assert rule is not None, f"{name}: every teacher config trains a SeerTeacher"
    assert rule[0] == rule[1], f"{name}: data num_steps {rule[0]} != sequence_length + 3 = {rule[1]}"
