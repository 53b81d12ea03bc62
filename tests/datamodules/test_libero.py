"""LiberoReader / LiberoDataModule on small HDF5 files written here in LIBERO's exact layout (see
datamodules/libero.py): windows against the source arrays, conventions, every bad-data message, and short
fits of both stages."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from datamodules.base import DataError, MemoryReader, WindowDataset, resize_uint8
from datamodules.libero import LiberoDataModule, LiberoReader, instruction_from_filename
from tests.conftest import make_demo, write_libero
from tests.datamodules.conftest import KITCHEN, KITCHEN_TEXT, LIVING, LIVING_TEXT, libero_datamodule


def windows(dm: LiberoDataModule, image_size: int | None = None) -> WindowDataset:
    dm.setup("fit")
    reader = dm.reader("train")
    return WindowDataset(reader, list(range(len(reader.episodes))), dm.num_steps, image_size or dm.image_size,
                         dm.normalizer, pad_tail=dm.pad_tail)


def test_index_order_instructions_and_robot(suite, tmp_path):
    root, source = suite
    reader = LiberoReader(root)
    assert [e.key.rsplit("/", 1)[1] for e in reader.episodes] == [
        f"{KITCHEN}:demo_0", f"{KITCHEN}:demo_1", f"{LIVING}:demo_1", f"{LIVING}:demo_9", f"{LIVING}:demo_10"]
    assert [e.length for e in reader.episodes] == [len(s["actions"]) for s in source]
    assert [e.instruction for e in reader.episodes] == [KITCHEN_TEXT] * 2 + [LIVING_TEXT] * 3
    assert instruction_from_filename("pick_up_the_black_bowl_demo.hdf5") == "pick up the black bowl"
    assert reader.robot.state_dim == 8 and reader.robot.action_dim == 7
    assert LiberoReader(root, gripper_state="binary").robot.state_dim == 7
    single = LiberoReader(root / LIVING)  # one file, or a list of files
    assert len(single.episodes) == 3 and single.files() == [root / LIVING]
    assert len(LiberoReader([root / KITCHEN, root / LIVING]).episodes) == 5


def test_windows_match_the_source(suite, tmp_path):
    root, source = suite
    dm = libero_datamodule(root, tmp_path)
    ds = windows(dm, image_size=128)
    norm = dm.normalizer
    seen = set()
    for i, (e, start) in enumerate(ds.index):
        w, src = ds[i], source[e]
        n, raw = len(src["actions"]), torch.from_numpy(src["actions"]).float()
        for t in range(4):
            f = min(start + t, n - 1)  # padding repeats the last frame
            assert w["valid"][t] == (start + t < n) and w["frame_index"][t] == f
            for v, key in enumerate(("agentview_rgb", "eye_in_hand_rgb")):
                want = torch.from_numpy(src[key][f]).permute(2, 0, 1)
                if want.shape[-1] != 128:  # the 256px file is resized to the requested size
                    want = resize_uint8(src[key][f:f + 1], 128)[0]
                assert torch.equal(w["images"][t, v], want)
            state = np.concatenate([src["ee_states"][f], src["gripper_states"][f]])
            torch.testing.assert_close(w["state"][t], torch.from_numpy(state).float())
            for j in range(3):
                valid = start + t + j < n
                assert w["action_valid"][t, j] == valid
                if valid:
                    torch.testing.assert_close(w["actions"][t, j], norm.normalize_actions(raw[start + t + j]))
                else:  # padded: the arm stays still, the gripper keeps the last command
                    assert (w["actions"][t, j, :6] == 0).all()
                    assert w["actions"][t, j, 6] == norm.normalize_actions(raw[n - 1])[6]
        seen.add((e, start))
    assert seen == {(e, s) for e, src in enumerate(source) for s in range(len(src["actions"]))}
    # The last window of a demo: one real step, three padding steps.
    last = ds.index.index((0, len(source[0]["actions"]) - 1))
    assert ds[last]["valid"].tolist() == [True, False, False, False]


def test_normalization_round_trip_and_gripper_conventions(suite, tmp_path):
    root, source = suite
    for convention, closed_target in (("close_positive", 1.0), ("open_positive", 0.0)):
        dm = libero_datamodule(root, tmp_path, gripper_action=convention)
        dm.setup("fit")
        norm = dm.normalizer
        # Statistics are the training demos' own: the held-out demo's actions do not widen the range.
        train = dm.split_episodes(dm.reader("train"), "train")
        assert len(train) == len(source) - 1
        raw = torch.from_numpy(np.concatenate([source[i]["actions"] for i in train])).float()
        np.testing.assert_allclose(norm.arm_low, raw[:, :6].min(0).values, rtol=0, atol=1e-6)
        np.testing.assert_allclose(norm.arm_high, raw[:, :6].max(0).values, rtol=0, atol=1e-6)
        assert norm.gripper_convention.startswith(f"1 = {'close' if closed_target else 'open'}")
        n = norm.normalize_actions(raw)
        assert n[:, :6].min() >= -1 and n[:, :6].max() <= 1
        closing = raw[:, 6] > 0
        assert (n[closing, 6] == closed_target).all() and (n[~closing, 6] == 1 - closed_target).all()
        # Un-normalizing always gives LIBERO's raw command back, whatever the convention.
        torch.testing.assert_close(norm.unnormalize_actions(n), raw, atol=1e-5, rtol=0)
    assert json.loads((next((tmp_path / "stats").glob("*.json"))).read_text())["mode"] == "minmax"
    quantile = libero_datamodule(root, tmp_path, normalization="quantile")
    quantile.setup("fit")
    assert quantile.normalizer.mode == "quantile"


def test_binary_gripper_state_is_the_previous_command(suite):
    root, source = suite
    reader = LiberoReader(root, gripper_state="binary")
    grip = source[0]["actions"][:, 6]
    previous = np.concatenate([grip[:1], grip[:-1]])
    for start, stop in ((0, 14), (5, 9), (7, 8)):
        fr = reader.read(0, start, stop)
        assert fr.state.shape == (stop - start, 7)
        np.testing.assert_array_equal(fr.state[:, 6], (previous[start:stop] < 0).astype(np.float32))
        np.testing.assert_allclose(fr.action, source[0]["actions"][start:stop], rtol=1e-6)
    assert reader.read(0, 6, 8).state[:, 6].tolist() == [1.0, 1.0] and reader.read(0, 8, 9).state[0, 6] == 0.0


def test_flip_images_rotates_both_views(suite):
    root, source = suite
    plain, flipped = LiberoReader(root).read(2, 3, 6), LiberoReader(root, flip_images=True).read(2, 3, 6)
    for a, b in ((plain.static, flipped.static), (plain.wrist, flipped.wrist)):
        np.testing.assert_array_equal(b, a[:, ::-1, ::-1])
        assert b.flags.c_contiguous
    np.testing.assert_array_equal(plain.static, source[2]["agentview_rgb"][3:6])


def test_handles_are_per_process_and_files_untouched(suite, tmp_path):
    root, _ = suite
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
    reader = LiberoReader(root)
    assert reader._handles == {}  # indexing opens and closes; reads open lazily
    reader.read(0, 0, 2)
    assert reader._handles[0].mode == "r"
    clone = pickle.loads(pickle.dumps(reader))  # what a spawned worker receives
    assert clone._handles == {} and clone.read(0, 0, 2).static.shape == (2, 128, 128, 3)
    reader._pid = -1  # as seen from a forked worker: the parent's handles are not reused
    reader.read(0, 0, 1)
    assert reader._pid > 0
    dm = libero_datamodule(root, tmp_path, num_workers=1, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    batch.validate(dm.robot, image_size=64, require_actions=True)
    reader.close()
    clone.close()
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}


# -- bad data -------------------------------------------------------------------------------------------
def bad_file(tmp_path, edit, name=KITCHEN, length=12) -> Path:
    """A valid one-demo file, then ``edit(h5py.File)`` breaks it."""
    root = tmp_path / "bad"
    root.mkdir(exist_ok=True)
    path = root / name
    write_libero(path, {"demo_0": make_demo(length, 32, np.random.default_rng(1))})
    with h5py.File(path, "a") as h:
        edit(h)
    return path


def replace(key, value):
    def edit(h):
        del h[key]
        h[key] = value
    return edit


def rename(key, new_name):
    def edit(h):
        group, name = key.rsplit("/", 1) if "/" in key else ("/", key)
        h[group].move(name, new_name)
    return edit


def nan_at(key, row=3):
    def edit(h):
        a = h[key][()]
        a[row, 0] = np.nan
        h[key][...] = a
    return edit


def rename_all_demos(h):
    for k in list(h["data"]):
        h["data"].move(k, f"x{k}")


D, OBS = "data/demo_0", "data/demo_0/obs"


@pytest.mark.parametrize("edit,match", [
    (rename("data", "other"), r"data: a 'data' group .*\['other'\]"),
    (rename_all_demos, r"data: demo_N groups"),
    (rename(f"{D}/actions", "act"), r"data/demo_0/actions: missing dataset"),
    (rename(f"{OBS}/eye_in_hand_rgb", "wrist"), r"obs/eye_in_hand_rgb: missing dataset"),
    (rename(f"{OBS}/ee_states", "x"), r"obs/ee_states: .*ee_states \(T, 6\), or ee_pos"),
    (rename(f"{OBS}/gripper_states", "x"), r"gripper_states: missing .*gripper_state='width'"),
    (replace(f"{OBS}/agentview_rgb", np.zeros((12, 32, 32, 3), np.float32)), r"uint8 .*float32"),
    (replace(f"{OBS}/agentview_rgb", np.zeros((12, 32, 32), np.uint8)),
     r"\(T, H, W, 3\), got uint8 \(12, 32, 32\)"),
    (replace(f"{D}/actions", np.zeros((12, 6))), r"actions: float \(T, 7\) .*\(12, 6\)"),
    (replace(f"{OBS}/gripper_states", np.zeros((12, 1))), r"gripper_states: float \(T, 2\)"),
    (replace(f"{D}/actions", np.zeros((0, 7))), r"actions: a non-empty demo, got 0 frames"),
    (replace(f"{D}/actions", np.zeros((11, 7))), r"demo_0: every stream with the same length .*: 11"),
    (lambda h: h["data"].attrs.__setitem__("problem_info", "{not json"), r"problem_info.*JSON"),
])
def test_bad_layout_fails_at_indexing(tmp_path, edit, match):
    path = bad_file(tmp_path, edit)
    with pytest.raises(DataError, match=match) as info:
        LiberoReader(path.parent)
    assert info.value.file == str(path)


@pytest.mark.parametrize("key,where", [("data/demo_0/actions", "all_actions"),
                                       ("data/demo_0/obs/ee_states", "read"),
                                       ("data/demo_0/obs/gripper_states", "read")])
def test_nan_fails_naming_the_frame(tmp_path, key, where):
    reader = LiberoReader(bad_file(tmp_path, nan_at(key)))
    with pytest.raises(DataError, match=rf"{key}: finite values, found NaN/inf at frame 3"):
        reader.all_actions() if where == "all_actions" else reader.read(0, 2, 6)
    reader.read(0, 4, 8)  # other frames of the demo stay readable


def test_truncated_and_missing_files(tmp_path):
    path = bad_file(tmp_path, lambda h: None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"<file>: a readable HDF5 file; h5py failed"):
        LiberoReader(path)
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="truncated or corrupt"):
        LiberoReader(path.parent)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"\*\.hdf5: a LIBERO suite directory"):
        LiberoReader(empty)
    with pytest.raises(DataError, match="an existing LIBERO"):
        LiberoReader(tmp_path / "nope_demo.hdf5")


def test_unknown_conventions_fail_before_reading(tmp_path):
    with pytest.raises(DataError, match=r"gripper_action: expected one of \('close_positive', 'open_posi"):
        LiberoDataModule(str(tmp_path / "missing"), gripper_action="open")
    with pytest.raises(DataError, match=r"gripper_state: expected one of \('width', 'binary'\)"):
        LiberoDataModule(str(tmp_path / "missing"), gripper_state="qpos")


def test_short_demos_skipped_without_padding(tmp_path, suite):
    path = bad_file(tmp_path, lambda h: None, length=5)  # needs num_steps + 2 = 6 frames for one full window
    write_libero(path.parent / LIVING, {"demo_0": make_demo(9, 32, np.random.default_rng(2))})
    dm = libero_datamodule(path.parent, tmp_path, pad_tail=False, val_fraction=0.0)
    with pytest.warns(UserWarning, match=rf"skipped 1 demo\(s\) shorter than 6 frames .*{KITCHEN}:demo_0 \("):
        dm.setup("fit")
    assert len(dm._train) == 9 - 6 + 1 and all(w["valid"].all() for w in dm._train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # padding: the short demo is used, no warning
        padded = libero_datamodule(path.parent, tmp_path, val_fraction=0.0)
        padded.setup("fit")
    assert len(padded._train) == 5 + 9


# -- training on LIBERO windows ---------------------------------------------------------------------------
@pytest.mark.parametrize("stage,gripper_state", [(1, "width"), (2, "binary")])
def test_short_fit(suite, tmp_path, stage, gripper_state):
    import lightning as L

    from teachers import SeerTeacher, TransformerTeacher
    from vitavla.backbones.internvl import InternVLBackbone
    from vitavla.checkpoint_io import read_state_dict
    from vitavla.modules import DistillationModule, PolicyModule
    from vitavla.student import VLAStudent

    root, _ = suite
    dm = libero_datamodule(root, tmp_path, image_size=224, gripper_state=gripper_state)
    student = VLAStudent(InternVLBackbone(path="tiny", tokens_per_image=4, image_size=224),
                         gripper_state=gripper_state, max_steps=4,
                         gripper_state_dim=2 if gripper_state == "width" else None)
    if stage == 1:  # the LIBERO Seer wiring: 2 finger positions in the state
        module = DistillationModule(student, SeerTeacher(preset="tiny", overrides={"gripper_width": True}))
    else:
        teacher = TransformerTeacher(hidden_size=32, num_layers=1, gripper_state="binary")
        module = PolicyModule(student, teacher, init_mode="only_finetune")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    # The checkpoint carries the data's normalizer (the hook copies it from the datamodule when saving).
    assert module.normalizer_state == dm.normalizer.state_dict()
    assert module.normalizer_state["gripper_convention"] == "1 = close (LIBERO -1 open / +1 close)"
    assert read_state_dict(ckpt)


@pytest.mark.parametrize("gripper_state", ["width", "binary"])
def test_normalize_state_uses_training_statistics(suite, tmp_path, gripper_state):
    root, source = suite
    dm = libero_datamodule(root, tmp_path, normalize_state=True, gripper_state=gripper_state)
    dm.setup("fit")
    reader, norm = dm.reader("train"), dm.normalizer
    train = dm.split_episodes(reader, "train")
    states = reader.all_states(train)
    arm = reader.robot.arm_dim
    assert norm.state_mean[:arm] == pytest.approx(states.mean(0)[:arm].tolist())
    # Binary gripper flags stay 0/1 (models threshold them); arm values are standardised.
    if gripper_state == "binary":
        assert norm.state_mean[arm:] == [0.0] and norm.state_std[arm:] == [1.0]
    ds = windows(dm)
    w = ds[0]
    e, start = ds.index[0]
    raw = torch.from_numpy(reader.read(e, start, start + 1).state[0])
    torch.testing.assert_close(w["state"][0], norm.normalize_state(raw))
    # The same rule as rollouts: the env's raw state goes through the checkpoint's normalizer.
    from vitavla.rollout.env import Obs
    from vitavla.rollout.runner import to_observation

    fr = reader.read(e, start, start + 1)
    obs = Obs(fr.static[0], fr.wrist[0], fr.state[0], "x")
    torch.testing.assert_close(to_observation(obs, dm.image_size, normalizer=norm).state[0], w["state"][0])
    # A different flag is a different cache entry, never a stale one.
    plain = libero_datamodule(root, tmp_path, gripper_state=gripper_state)
    plain.setup("fit")
    assert not plain.normalizer.normalizes_state


@pytest.mark.parametrize("normalize_state, one_file", [(False, False), (True, False), (True, True)])
def test_cache_frames_serves_the_same_windows_without_touching_files(suite, tmp_path, normalize_state, one_file):
    """``cache_frames`` decodes each episode once into RAM; every window equals the file-backed one bit for
    bit (labels and states normalised once for all held frames there, per window here), and the training
    loop then opens no file (the h5py handles stay unused). With one frame size (``one_file``: the 128 px
    file) a batch is gathered in one go; with two (128 and 256 px) window by window."""
    root, source = suite
    if one_file:
        root, source = root / KITCHEN, source[:2]
    plain = libero_datamodule(root, tmp_path, normalize_state=normalize_state, val_fraction=0.5 if one_file else 0.2)
    cached = libero_datamodule(root, tmp_path, cache_frames=True, normalize_state=normalize_state,
                        val_fraction=0.5 if one_file else 0.2)
    for dm in (plain, cached):
        dm.setup("fit")
    assert isinstance(cached._train.reader, MemoryReader) and isinstance(cached._val.reader, MemoryReader)
    assert cached._train._batched == one_file and cached._train._memory
    assert cached._train.index == plain._train.index and cached._val.index == plain._val.index
    inner = cached._train.reader.inner
    inner.close()  # any later file read would reopen a handle
    for ds_c, ds_p in ((cached._train, plain._train), (cached._val, plain._val)):
        order = torch.randperm(len(ds_p), generator=torch.Generator().manual_seed(0)).tolist()
        # one window at a time, and a shuffled batch gathered at once (the DataLoader's __getitems__)
        for i, batched in zip(order, ds_c.__getitems__(order)):
            b = ds_p[i]
            for a in (ds_c[i], batched):
                assert a.keys() == b.keys()
                for k in a:
                    assert (a[k] == b[k]) if isinstance(a[k], str) else torch.equal(a[k], b[k]), (i, k)
    assert inner._handles == {}
    pixels = sum(s["agentview_rgb"][0].size * 2 * len(s["actions"]) for s in source)
    assert cached._train.reader.nbytes + cached._val.reader.nbytes >= pixels
    assert len(cached._train.reader.offset) + len(cached._val.reader.offset) == len(source)
    with pytest.raises(DataError, match=r"frame range inside \[0, 14\)"):
        MemoryReader(inner, [0]).read(0, 0, 99)
