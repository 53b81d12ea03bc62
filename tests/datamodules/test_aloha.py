"""AlohaReader / AlohaDataModule on episodes written here in the exact ACT / act-plus-plus HDF5 layout."""

from __future__ import annotations

import hashlib
import io
import json

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import datamodules.aloha as aloha
from datamodules.aloha import AlohaDataModule, AlohaReader
from datamodules.base import DataError, resize_uint8
from teachers.transformer_teacher import TransformerTeacher
from vitavla.backbones.internvl import InternVLBackbone
from vitavla.batch import RobotSpec, collate_windows
from vitavla.modules import DistillationModule, PolicyModule
from vitavla.student import VLAStudent
from tests.conftest import CAMS, episode_arrays, jpeg, write_dataset, write_episode  # noqa: F401

COLS = {"left": [*range(7)], "right": [*range(7, 14)], "both": [*range(6), *range(7, 13), 6, 13]}



def datamodule(root, tmp_path, **kw) -> AlohaDataModule:
    opts = dict(instruction="fold the towel", num_steps=4, image_size=32, batch_size=2, num_workers=0,
                stats_cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    dm = AlohaDataModule(str(root), **{**opts, **kw})
    dm.setup("fit")
    return dm


def digest(root) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in root.iterdir()}


@pytest.mark.parametrize("arms,static,wrist", [("left", "cam_high", "cam_left_wrist"),
                                               ("right", "cam_low", "cam_right_wrist"),
                                               ("both", "cam_high", "cam_right_wrist")])
def test_windows_match_the_source_arrays(tmp_path, arms, static, wrist):
    src = write_dataset(tmp_path / "d")
    before = digest(tmp_path / "d")
    dm = datamodule(tmp_path / "d", tmp_path, arms=arms, static_camera=static,
                    wrist_camera=wrist if arms == "both" else None)
    n = 2 if arms == "both" else 1
    assert dm.robot == RobotSpec(arm_dim=6 * n, gripper_dim=n, gripper_state="width", gripper_state_dim=n)
    names = [e.key for e in dm.reader("train").episodes]
    assert names == ["episode_0.hdf5", "episode_2.hdf5", "episode_10.hdf5"]  # numeric order
    ds, norm, cols, arm = dm._train, dm.normalizer, COLS[arms], 6 * n
    assert norm.gripper_convention.startswith("1 = open")
    for k, (e, start) in enumerate(ds.index):
        w, s = ds[k], src[e]
        assert w["instruction"] == "fold the towel"
        frames = w["frame_index"].numpy()
        assert torch.equal(w["state"], torch.from_numpy(s["qpos"][frames][:, cols].astype(np.float32)))
        assert torch.equal(w["images"][:, 0], resize_uint8(s["images"][static][frames], 32))
        assert torch.equal(w["images"][:, 1], resize_uint8(s["images"][wrist][frames], 32))
        raw = torch.from_numpy(s["action"][:, cols].astype(np.float32))
        for t in range(4):
            for j in range(3):
                if w["action_valid"][t, j]:  # the label of step t, chunk j is the action at t + j
                    target = raw[start + t + j]
                    assert torch.allclose(norm.unnormalize_actions(w["actions"][t, j]), target, atol=1e-5)
                    assert torch.allclose(w["actions"][t, j], norm.normalize_actions(target))
        assert w["actions"][..., :arm].abs().max() <= 1 and w["actions"][..., arm:].min() >= 0
        assert w["actions"][..., arm:].max() <= 1
    everything = np.concatenate([s["action"][:, cols] for s in src]).astype(np.float32)
    everything = norm.normalize_actions(torch.from_numpy(everything))
    assert torch.allclose(everything.amin(0), torch.tensor([-1.0] * arm + [0.0] * n))  # fitted min/max
    assert torch.allclose(everything.amax(0), torch.ones(arm + n))
    assert digest(tmp_path / "d") == before, "reading must never modify the episode files"


def test_compressed_matches_raw_and_decodes_only_requested_frames(tmp_path, monkeypatch):
    raw_src = write_dataset(tmp_path / "raw", lengths=(8,), ids=(0,))
    comp_src = write_dataset(tmp_path / "jpg", lengths=(8,), ids=(0,), compress=True)
    raw = AlohaReader(tmp_path / "raw", static_camera="cam_low", instruction="x").read(0, 2, 5)
    reader = AlohaReader(tmp_path / "jpg", static_camera="cam_low", instruction="x")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(aloha.Image, "open", lambda fp: opened.append(1) or real_open(fp))
    comp = reader.read(0, 2, 5)
    assert len(opened) == 2 * 3  # two views, frames 2..4 only
    for view, cam in ((comp.static, "cam_low"), (comp.wrist, "cam_left_wrist")):
        ref = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))[..., ::-1]
                        for b in comp_src[0]["jpeg"][cam][2:5]])
        assert np.array_equal(view, ref)  # exact: the right compress_len row and the cv2 channel order
        diff = np.abs(view.astype(int) - raw_src[0]["images"][cam][2:5])
        assert diff.mean() < 3 and diff.max() < 40  # JPEG quality 50 on smooth images
    assert np.array_equal(comp.state, raw.state) and np.array_equal(comp.action, raw.action)
    assert np.abs(comp.static.astype(int) - raw.static).mean() < 3
    rgb_reader = AlohaReader(tmp_path / "jpg", static_camera="cam_low", instruction="x", jpeg_bgr=False)
    rgb = rgb_reader.read(0, 2, 5)
    rgb_reader.close()
    assert np.array_equal(rgb.static, comp.static[..., ::-1])
    reader.close()  # HDF5 refuses to reopen a file for writing while this process reads it
    with h5py.File(tmp_path / "jpg" / "episode_0.hdf5", "r+") as f:
        del f["compress_len"]  # without it the zero padding is stripped at the JPEG's last byte
    assert np.array_equal(AlohaReader(tmp_path / "jpg", static_camera="cam_low", instruction="x")
                          .read(0, 2, 5).static, comp.static)


def test_single_arm_piper_recording(tmp_path):
    root = tmp_path / "piper"
    src = write_dataset(root, width=7, cams=("cam_high", "cam_wrist"))
    dm = datamodule(root, tmp_path, wrist_camera="cam_wrist")
    assert dm.robot.state_dim == 7 and dm.robot.action_dim == 7
    w = dm._train[3]
    assert torch.equal(w["state"], torch.from_numpy(src[0]["qpos"][3:7].astype(np.float32)))
    assert torch.equal(w["images"][:, 1], resize_uint8(src[0]["images"]["cam_wrist"][3:7], 32))
    fixed = datamodule(root, tmp_path, wrist_camera="cam_wrist", gripper_range=[0.0, 0.08])
    assert (fixed.normalizer.gripper_low, fixed.normalizer.gripper_high) == ([0.0], [0.08])
    assert torch.allclose(fixed._train[3]["actions"][0, 0, 6],
                          torch.tensor(src[0]["action"][3, 6] / 0.08, dtype=torch.float32).clamp(0, 1))
    for arms in ("right", "both"):
        message = rf"episode_0.hdf5: /observations/qpos: has 7 columns .*arms='{arms}'"
        with pytest.raises(DataError, match=message):
            AlohaReader(root, arms=arms, wrist_camera="cam_wrist", instruction="x")
    message = r"cam_left_wrist: camera missing; cameras found: \['cam_high', 'cam_wrist'\]"
    with pytest.raises(DataError, match=message):
        AlohaReader(root, instruction="x")


@pytest.mark.parametrize("compress", [False, True])
def test_full_resolution_frames_are_resized(tmp_path, compress):
    src = write_dataset(tmp_path / "d", lengths=(2,), ids=(0,), compress=compress, hw=(480, 640),
                        cams=("cam_high", "cam_left_wrist"))
    w = datamodule(tmp_path / "d", tmp_path, image_size=224, fast_jpeg=False)._train[0]
    assert w["images"].shape == (4, 2, 3, 224, 224) and w["images"].dtype == torch.uint8
    assert w["valid"].tolist() == [True, True, False, False]
    ref = src[0]["images"]["cam_high"]
    if compress:
        ref = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))[..., ::-1]
                        for b in src[0]["jpeg"]["cam_high"]])
    assert torch.equal(w["images"][:2, 0], resize_uint8(ref, 224))
    if compress:  # the default scaled JPEG decode: 480x640 -> 240x320 in libjpeg, then 224; nearly the same
        fast = datamodule(tmp_path / "d", tmp_path, image_size=224)._train[0]["images"][:2, 0]
        assert (fast.float() - w["images"][:2, 0].float()).abs().mean() < 2.0


def test_padding_and_masks_at_episode_end(tmp_path):
    src = write_dataset(tmp_path / "d", lengths=(6,), ids=(0,))
    dm = datamodule(tmp_path / "d", tmp_path)
    ds, arm = dm._train, dm.robot.arm_dim
    assert [s for _, s in ds.index] == list(range(6)), "a window starts at every frame"
    w = ds[4]  # frames 4, 5 real; two padding steps
    assert w["valid"].tolist() == [True, True, False, False]
    assert w["action_valid"].tolist() == [[True, True, False], [True, False, False], [False] * 3, [False] * 3]
    assert not w["actions"][~w["action_valid"]][:, :arm].any(), "padded arm labels are 'no motion'"
    assert torch.equal(w["images"][2], w["images"][1]) and torch.equal(w["images"][3], w["images"][1])
    assert torch.equal(w["state"][3], torch.from_numpy(src[0]["qpos"][5, :7].astype(np.float32)))
    strict = datamodule(tmp_path / "d", tmp_path, pad_tail=False)._train
    assert [s for _, s in strict.index] == [0]  # 6 frames hold one full window of 4 steps + 2 chunk labels
    assert strict[0]["valid"].all() and strict[0]["action_valid"].all()


def test_instruction_precedence(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    attrs = [{"instruction": "attr 0"}, {}, {"instruction": "attr 2", "language_instruction": "lang 2"},
             {"language_instruction": b"lang 3"}, {}]
    for i, a in enumerate(attrs):
        write_episode(root / f"episode_{i}.hdf5", episode_arrays(5, seed=i), attrs=a)
    (root / "instructions.json").write_text(json.dumps({"episode_0.hdf5": "json 0", "episode_1": "json 1"}))
    reader = AlohaReader(root, instruction="default")
    # instructions.json (file name or stem) > attr instruction > attr language_instruction > argument
    assert [e.instruction for e in reader.episodes] == ["json 0", "json 1", "attr 2", "lang 3", "default"]
    with pytest.raises(DataError, match=r"episode_4.hdf5: instruction: no instruction"):
        AlohaReader(root)
    (root / "instructions.json").write_text("{not json")
    with pytest.raises(DataError, match=r"instructions.json: /: not valid JSON"):
        AlohaReader(root, instruction="default")


def _edit(key, value=None):
    """Replace (or, with value None, delete) one dataset of the episode file."""
    def edit(f, arrays):
        del f[key]
        if value is not None:
            f[key] = value(arrays) if callable(value) else value
    return edit


def _set(key, index, value):
    def edit(f, arrays):
        f[key][index] = value
    return edit


def _scramble_jpeg(f, arrays):
    buf = f["observations/images/cam_high"][2]
    buf[:64] = 7  # no JPEG start-of-image marker any more; length and end marker unchanged
    f["observations/images/cam_high"][2] = buf


QPOS, ACTION, HIGH = "observations/qpos", "action", "observations/images/cam_high"
BAD = {  # case -> (edit of a valid compressed 8-frame episode, expected message, reader options)
    "missing qpos": (_edit(QPOS), r"/observations/qpos: missing; expected a \(T, 14\)", {}),
    "missing action": (_edit(ACTION), r"/action: missing", {}),
    "missing camera": (_edit(HIGH), r"/observations/images/cam_high: camera missing; "
                       r"cameras found: \['cam_left_wrist', 'cam_low', 'cam_right_wrist'\]", {}),
    "qpos width": (_edit(QPOS, np.zeros((8, 10))), r"qpos: has shape \(8, 10\); expected \(T, 14\)", {}),
    "qpos dtype": (_edit(QPOS, np.zeros((8, 14), np.int32)), r"qpos: dtype int32; expected float", {}),
    "qpos nan": (_set(QPOS, (3, 2), np.nan), r"qpos: contains NaN/inf \(first at frame 3, column 2\)", {}),
    "action inf": (_set(ACTION, (5, 13), np.inf),
                   r"/action: contains NaN/inf \(first at frame 5, column 13\)", {}),
    "empty": (lambda f, a: [_edit(k, np.zeros((0, 14)))(f, a) for k in (QPOS, ACTION)],
              r"/observations/qpos: empty episode", {}),
    "action length": (_edit(ACTION, lambda a: a["action"][:7]),
                      r"/action: has shape \(7, 14\); expected \(8, 14\)", {}),
    "image length": (_edit(HIGH, np.zeros((7, 100), np.uint8)),
                     r"cam_high: shape \(7, 100\); expected \(8, H, W, 3\) raw frames or \(8, padded_len\)",
                     {}),
    "image dtype": (_edit(HIGH, np.zeros((8, 4, 4, 3), np.float32)),
                    r"cam_high: dtype float32; expected uint8", {}),
    "compress_len length": (_edit("compress_len", np.ones((4, 7))),
                            r"/compress_len: has shape \(4, 7\); expected \(n_cams, 8\)", {}),
    "compress_len values": (_edit("compress_len", np.full((4, 8), 5.0)),
                            r"/compress_len: no row matches camera 'cam_high'", {}),
    "corrupt jpeg": (_scramble_jpeg, r"/observations/images/cam_high\[2\]: corrupt JPEG", {}),
    "bad arms": (None, r"arms: must be 'left', 'right' or 'both', got 'up'", {"arms": "up"}),
    "both without wrist": (None, r"wrist_camera: arms='both' has two wrist cameras", {"arms": "both"}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_raises_data_error_naming_file_key_and_expectation(tmp_path, case):
    edit, message, opts = BAD[case]
    root = tmp_path / "d"
    [arrays] = write_dataset(root, lengths=(8,), ids=(0,), compress=True)
    if edit is not None:
        with h5py.File(root / "episode_0.hdf5", "r+") as f:
            edit(f, arrays)
    with pytest.raises(DataError, match=message):
        AlohaReader(root, instruction="x", **opts).read(0, 0, 8)


@pytest.mark.parametrize("damage", ["truncated", "not hdf5", "no files"])
def test_unreadable_files(tmp_path, damage):
    root = tmp_path / "d"
    write_dataset(root, lengths=(8,), ids=(0,))
    path = root / "episode_0.hdf5"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif damage == "not hdf5":
        path.write_text("not an hdf5 file")
    else:
        path.rename(root / "ep0.h5")
    match = r"d: episode_\*.hdf5: no episode files" if damage == "no files" else \
        r"episode_0.hdf5: /: cannot read as HDF5 \(truncated or corrupt file\?\)"
    with pytest.raises(DataError, match=match):
        AlohaReader(root, instruction="x")


def test_worker_processes_read_the_same_windows(tmp_path):
    write_dataset(tmp_path / "d", compress=True)
    ds = datamodule(tmp_path / "d", tmp_path)._train
    loader = dict(batch_size=4, collate_fn=collate_windows)
    main = next(iter(DataLoader(ds, **loader)))  # opens the HDF5 handles in this process before the fork
    worker = next(iter(DataLoader(ds, num_workers=1, **loader)))
    assert torch.equal(main.images, worker.images) and torch.equal(main.actions, worker.actions)


def width_teacher(arm_dim: int, gripper_dim: int) -> TransformerTeacher:
    """A teacher reading one gripper width per gripper, like the data (state_dim = arm + gripper)."""
    kw = dict(hidden_size=32, num_layers=1, max_steps=8, arm_dim=arm_dim, gripper_dim=gripper_dim,
              gripper_state="width")
    return TransformerTeacher(gripper_state_dim=gripper_dim, **kw)


def fit(module, root, tmp_path, **kw) -> None:
    dm = datamodule(root, tmp_path, image_size=224, val_fraction=0.34, **kw)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


@pytest.mark.parametrize("stage,arms", [(1, "left"), (2, "left"), (2, "both")])
def test_short_fit_with_tiny_models(tmp_path, stage, arms):
    root = tmp_path / "d"
    write_dataset(root, lengths=(6, 7, 8), compress=stage == 2)
    n = 2 if arms == "both" else 1
    student = VLAStudent(InternVLBackbone(path="tiny", tokens_per_image=4), arm_dim=6 * n, gripper_dim=n,
                         gripper_state="width", gripper_state_dim=n, max_steps=4)
    teacher = width_teacher(6 * n, n)
    module = DistillationModule(student, teacher) if stage == 1 else \
        PolicyModule(student, teacher, init_mode="only_finetune")
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    fit(module, root, tmp_path, arms=arms, wrist_camera="cam_left_wrist" if arms == "both" else None)
    after = [p for p in module.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "two optimizer steps changed nothing"
