"""Seer checkpoint loading on the tiny preset: official layouts, round trips and the one-message errors."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from safetensors.torch import save_file

from teachers.seer import CheckpointMismatchError, SeerTeacher, export_seer_checkpoint, read_state_dict


@pytest.fixture(scope="module")
def source():
    return SeerTeacher("tiny", seed=7)


@pytest.fixture
def official(source):
    """The tiny teacher's weights in the official layout: ``module.`` keys under ``model_state_dict``."""
    return export_seer_checkpoint(source.model)["model_state_dict"]


def _save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer_state_dict": optimizer}, path)
    return path


def _mae(source):
    return {k: v.clone() for k, v in source.model.vision_encoder.state_dict().items()}


def test_round_trip_through_official_layouts(tmp_path, source, official):
    ckpt = _save(tmp_path, official)
    mae_path = tmp_path / "mae.pth"
    torch.save({"model": _mae(source)}, mae_path)
    loaded = SeerTeacher("tiny", checkpoint=str(ckpt), vit_checkpoint=str(mae_path), seed=0)
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    flat = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, str(flat))
    from_safetensors = SeerTeacher("tiny", checkpoint=str(flat), vit_checkpoint=str(mae_path), seed=1)
    torch.testing.assert_close(from_safetensors.model.obs_tokens, source.model.obs_tokens, atol=0, rtol=0)
    assert len(official) == 102 and all(k.startswith("module.") for k in official)


def test_gpt2_weights_keep_the_conv1d_layout(official):
    # HF Conv1D stores (in, out): c_attn (D, 3D), c_fc (D, 4D), mlp.c_proj (4D, D).
    assert tuple(official["module.transformer_backbone.h.0.attn.c_attn.weight"].shape) == (32, 96)
    assert tuple(official["module.transformer_backbone.h.0.mlp.c_fc.weight"].shape) == (32, 128)
    assert tuple(official["module.transformer_backbone.h.0.mlp.c_proj.weight"].shape) == (128, 32)


def test_every_problem_in_one_message(tmp_path, official):
    state = dict(official)
    del state["module.text_projector.bias"]
    state["module.not_a_seer_weight"] = torch.zeros(3)
    state["module.state_projector.weight"] = torch.zeros(32, 48)
    path = _save(tmp_path, state, "broken.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        SeerTeacher("tiny", checkpoint=str(path))
    message = str(err.value)
    assert str(path) in message and "Seer preset tiny" in message
    assert "missing keys (1): text_projector.bias" in message
    assert "unexpected keys (1): not_a_seer_weight" in message
    assert "shape mismatches (1): state_projector.weight: expected (32, 64), found (32, 48)" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_each_problem_alone(tmp_path, official, problem):
    state = dict(official)
    if problem == "missing":
        del state["module.transformer_backbone.ln_f.weight"]
        expected = "missing keys (1): transformer_backbone.ln_f.weight"
    elif problem == "unexpected":
        state["module.extra.bias"] = torch.zeros(1)
        expected = "unexpected keys (1): extra.bias"
    else:
        state["module.transformer_backbone.h.1.attn.c_attn.weight"] = torch.zeros(96, 32)
        expected = "transformer_backbone.h.1.attn.c_attn.weight: expected (32, 96), found (96, 32)"
    with pytest.raises(CheckpointMismatchError, match=re.escape(expected)) as err:
        SeerTeacher("tiny", checkpoint=str(_save(tmp_path, state)))
    assert str(err.value).count("\n") == 1  # the file line plus the one problem


def test_history_length(tmp_path, official):
    pos_key = "module.transformer_backbone_position_embedding"
    longer = dict(official)
    longer[pos_key] = torch.randn(1, 14, 1, 32)
    path = _save(tmp_path, longer, "pretrain.pth")
    message = "checkpoint has history 14 but preset tiny expects 10.*allow_history_truncation"
    with pytest.raises(CheckpointMismatchError, match=message):
        SeerTeacher("tiny", checkpoint=str(path))
    truncated = SeerTeacher("tiny", checkpoint=str(path), allow_history_truncation=True)
    assert torch.equal(truncated.model.transformer_backbone_position_embedding, longer[pos_key][:, :10])

    shorter = dict(official)
    shorter[pos_key] = torch.randn(1, 7, 1, 32)
    path = _save(tmp_path, shorter, "libero.pth")
    message = "checkpoint has history 7 but preset tiny expects 10"
    with pytest.raises(CheckpointMismatchError, match=message) as err:
        SeerTeacher("tiny", checkpoint=str(path), allow_history_truncation=True)
    assert "allow_history_truncation" not in str(err.value)


def test_mae_file(tmp_path, source):
    mae = _mae(source)
    mae["pos_embed"] = mae["pos_embed"] + 1.0  # must come from the file, not from the construction-time table
    mae["decoder_embed.weight"] = torch.zeros(4, 4)  # MAE decoder keys are ignored
    mae["mask_token"] = torch.zeros(1, 1, 4)
    path = tmp_path / "mae.pth"
    torch.save({"model": mae}, path)
    teacher = SeerTeacher("tiny", vit_checkpoint=str(path))
    assert torch.equal(teacher.model.vision_encoder.pos_embed, mae["pos_embed"])
    assert torch.equal(teacher.model.vision_encoder.blocks[1].mlp.fc2.weight, mae["blocks.1.mlp.fc2.weight"])

    del mae["norm.bias"]
    torch.save({"model": mae}, path)
    message = r"does not fit the MAE ViT encoder:\n  missing keys \(1\): norm.bias"
    with pytest.raises(CheckpointMismatchError, match=message):
        SeerTeacher("tiny", vit_checkpoint=str(path))


def test_unsafe_or_absent_files_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        SeerTeacher("tiny", checkpoint=str(tmp_path / "nowhere.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pth")
