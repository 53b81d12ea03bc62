"""SeerTeacher on the tiny preset (fast), and the released presets' sizes on the meta device."""

from __future__ import annotations

import pytest
import torch

from teachers import SeerConfig, SeerTeacher
from teachers.base import ActionHead
from teachers.seer import PRESETS, RELEASED_TRAINABLE_PARAMETERS, SeerModel, seer_attention_mask
from teachers.seer.teacher import CLIP_MEAN, CLIP_STD
from teachers.seer.text import CLIPTextEncoder
from vitavla.batch import BatchError, fake_window


@pytest.fixture(scope="module")
def tiny():
    return SeerTeacher("tiny").freeze()


@pytest.mark.parametrize("preset", sorted(RELEASED_TRAINABLE_PARAMETERS))
def test_released_presets_build_on_meta_with_official_parameter_counts(preset):
    with torch.device("meta"):
        model = SeerModel(SeerConfig.preset(preset))
    assert model.trainable_checkpoint_parameters() == RELEASED_TRAINABLE_PARAMETERS[preset]
    keys = model.state_dict().keys()
    assert sum(not k.startswith("vision_encoder.") for k in keys) == 400
    assert sum(k.startswith("vision_encoder.") for k in keys) == 150
    assert "image_decoder_position_embedding" not in keys  # recomputed, in no checkpoint


def test_preset_values():
    large = SeerConfig.preset("seer_large_calvin")
    assert (large.hidden_size, large.num_heads, large.num_resampler_queries, large.num_obs_tokens_per_image,
            large.tokens_per_step, large.action_token_start) == (1024, 16, 16, 16, 71, 68)
    calvin, libero = SeerConfig.preset("seer_calvin"), SeerConfig.preset("seer_libero")
    assert (calvin.tokens_per_step, calvin.action_token_start, calvin.sequence_length) == (37, 34, 10)
    assert (libero.sequence_length, libero.gripper_width) == (7, True)
    assert SeerConfig.preset("seer_calvin", sequence_length=7).sequence_length == 7
    with pytest.raises(ValueError, match="unknown Seer preset 'seer'"):
        SeerConfig.preset("seer")
    assert set(PRESETS) == {"seer_calvin", "seer_large_calvin", "seer_libero", "tiny"}


def test_teacher_contract_attributes(tiny):
    assert (tiny.hidden_size, tiny.num_action_queries, tiny.max_steps, tiny.image_size) == (32, 3, 10, 224)
    assert tiny.robot.gripper_state == "binary" and tiny.robot.state_dim == 7
    assert isinstance(tiny.action_head, ActionHead)
    # The head is the model's decoder itself, not a copy.
    assert tiny.action_head.action_decoder[0].weight is tiny.model.action_decoder[0].weight
    libero = SeerTeacher("tiny", overrides={"gripper_width": True, "sequence_length": 7})
    assert libero.robot.gripper_state == "width" and libero.robot.state_dim == 8 and libero.max_steps == 7


def test_encode_shape_and_shorter_windows(tiny):
    window = fake_window(tiny.robot, batch_size=2, num_steps=4)
    hidden = tiny.encode(window)
    assert hidden.shape == (2, 4, 3, 32) and hidden.dtype == torch.float32
    out = tiny.predict(window)
    assert out.arm.shape == (2, 4, 3, 6) and out.gripper_logit.shape == (2, 4, 3, 1)
    assert out.arm.abs().max() <= 1
    full = fake_window(tiny.robot, batch_size=1, num_steps=10)
    assert tiny.encode(full).shape == (1, 10, 3, 32)
    with pytest.raises(BatchError, match="at most 10"):
        tiny.encode(fake_window(tiny.robot, batch_size=1, num_steps=11))


def test_step_t_depends_only_on_steps_up_to_t(tiny):
    window = fake_window(tiny.robot, batch_size=2, num_steps=6)
    before = tiny.encode(window)
    g = torch.Generator().manual_seed(1)
    window.images[:, 3:] = torch.randint(0, 256, window.images[:, 3:].shape, dtype=torch.uint8, generator=g)
    window.state[:, 3:] += 1.0
    after = tiny.encode(window)
    torch.testing.assert_close(after[:, :3], before[:, :3], atol=1e-6, rtol=0)
    assert (after[:, 3:] - before[:, 3:]).abs().max() > 1e-3


def test_window_path_equals_official_convention_path(tiny):
    """Teacher = uint8 -> /255 -> CLIP normalisation, RobotSpec state split, text features per instruction."""
    window = fake_window(tiny.robot, batch_size=2, num_steps=3)
    x = window.images.float() / 255.0
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    text = tiny.text_encoder.encode_uncached(window.instruction)[:, None].expand(2, 3, -1)
    # Binary grippers in {0, 1}: Seer's "< 1 is closed" and RobotSpec's "> 0.5 is open" agree.
    out = tiny.model(x[:, :, 0], x[:, :, 1], window.state, text)
    torch.testing.assert_close(tiny.encode(window), out.action_query_hidden, atol=1e-6, rtol=0)
    ours = tiny.predict(window)
    torch.testing.assert_close(ours.gripper_prob, out.gripper_prob, atol=1e-6, rtol=0)


def test_seer_gripper_rule_accepts_both_conventions(tiny):
    state = torch.zeros(1, 4, 7)
    state[0, :, 6] = torch.tensor([-1.0, 1.0, 0.0, 1.0])
    _, grip = tiny.model.split_state(state)
    assert grip[0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    with pytest.raises(ValueError, match="takes a 7-D state"):
        tiny.model.split_state(torch.zeros(1, 4, 8))


def test_frozen_teacher_stays_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())


def test_unfrozen_teacher_trains_all_but_vision_and_text():
    teacher = SeerTeacher("tiny")
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("model.vision_encoder.", "text_encoder.")) for n in trainable)
    teacher.train()
    assert teacher.model.transformer_backbone.training and not teacher.text_encoder.training
    window = fake_window(teacher.robot, batch_size=2, num_steps=3)
    loss, _ = teacher.training_loss(window)
    loss.backward()
    assert teacher.model.action_pred_token.grad is not None


def test_tiny_preset_is_deterministic():
    a, b = SeerTeacher("tiny", seed=3), SeerTeacher("tiny", seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    c = SeerTeacher("tiny", seed=4)
    assert not torch.equal(a.model.text_projector.weight, c.model.text_projector.weight)


def test_text_features_are_cached_per_instruction(tiny):
    encoder = tiny.text_encoder
    encoder.clear_cache()
    calls = []
    hook = encoder.model.text_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        window = fake_window(tiny.robot, batch_size=4, num_steps=2, instructions=("open the drawer",))
        first = tiny.encode(window)
        assert len(calls) == 1  # one CLIP call for 4 copies of one instruction
        second = tiny.encode(window)
        assert len(calls) == 1
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        features = encoder(["open the drawer", "stack the blocks", "stack the blocks"])
        assert len(calls) == 2
    finally:
        hook.remove()
    fresh = encoder.encode_uncached(["open the drawer", "stack the blocks"])
    torch.testing.assert_close(features[[0, 1]], fresh, atol=1e-5, rtol=0)  # padding differs
    assert torch.equal(features[1], features[2])


def test_cache_is_bounded():
    encoder = CLIPTextEncoder.tiny(dim=8, cache_size=2)
    encoder(["a", "b"])
    encoder(["c"])
    assert list(encoder._cache) == ["b", "c"]


def test_clip_text_from_local_hf_directory(tmp_path):
    reference = CLIPTextEncoder.tiny(dim=64, seed=0)
    reference.model.save_pretrained(tmp_path / "clip")
    reference.tokenizer.save_pretrained(tmp_path / "clip")
    teacher = SeerTeacher("tiny", clip_text=str(tmp_path / "clip"))
    texts = ["put the bowl on the plate", "turn off the led"]
    torch.testing.assert_close(teacher.text_encoder(texts), reference(texts), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not an HF-format CLIP directory"):
        SeerTeacher("tiny", clip_text=str(tmp_path))


def test_text_width_must_match_projector(tmp_path):
    other = CLIPTextEncoder.tiny(dim=16)
    other.model.save_pretrained(tmp_path)
    other.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="16-D features but Seer preset tiny projects 64-D"):
        SeerTeacher("tiny", clip_text=str(tmp_path))


def test_released_presets_need_their_frozen_encoders():
    with pytest.raises(ValueError, match="needs vit_checkpoint"):
        SeerTeacher("seer_calvin", clip_text="/somewhere")
    with pytest.raises(ValueError, match="needs clip_text"):
        SeerTeacher("seer_libero", vit_checkpoint="/somewhere/mae.pth")


def test_attention_mask_structure():
    cfg = SeerConfig.preset("seer_calvin")
    full = seer_attention_mask(cfg, 10)
    assert torch.equal(seer_attention_mask(cfg, 4), full[: 4 * 37, : 4 * 37])
    assert full.any(dim=1).all()  # no query row is fully masked
    step0 = full[:37, :37]
    assert step0[:, :16].all() and not step0[:16, 16:].any()  # everyone sees A, nobody sees B ...
    assert step0[34:, 16:34].all() and not step0[34:, 34:].any()  # ... but actions see their foresight
    assert not step0[16:34, 16:].any()
    assert not full[:37, 37:].any()  # nothing of a later step
    assert full[37:74, :16].all() and not full[37:74, 16:37].any()  # earlier steps: A only


def test_training_objective_weights_come_from_the_config():
    from teachers.seer.training import SeerObjective

    window = fake_window(SeerTeacher("tiny").robot, batch_size=2, num_steps=4)
    default = SeerTeacher("tiny").eval()  # eval: no random shift, so both losses see the same frames
    heavy = SeerTeacher("tiny", objective=SeerObjective(gripper_weight=1.0)).eval()
    assert default.objective.gripper_weight == 0.01 and heavy.objective.gripper_weight == 1.0
    total_d, parts_d = default.training_loss(window)
    total_h, parts_h = heavy.training_loss(window)
    for k in ("arm", "gripper", "image"):  # same weights (seed 0), so the same parts
        torch.testing.assert_close(parts_d[k], parts_h[k])
    torch.testing.assert_close(total_h - total_d, 0.99 * parts_d["gripper"])
