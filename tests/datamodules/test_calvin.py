"""CALVIN reader, packed cache and datamodule on small datasets written in the exact on-disk layout."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.base import DataError, resize_uint8
from datamodules.calvin import CalvinDataModule, CalvinReader, CalvinSplit, pack_calvin
from datamodules.calvin_pack import MANIFEST
from tests.datamodules.conftest import STATIC, write_annotations, write_split

NUM_STEPS = 4  # a window needs NUM_STEPS + 2 frames (chunk of 3)
TRAIN_EPISODES = [(1000, 1029), (2000, 2029)]
TRAIN_SEGMENTS = [(1000, 1015, "open the drawer"), (1006, 1029, "lift the red block"),
                  (2000, 2020, "push the button"), (2025, 2028, "too short to use")]
VAL_EPISODES = [(500, 515)]
VAL_SEGMENTS = [(500, 512, "turn on the light bulb")]


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def calvin(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_D_D")
    src = {"training": write_split(root / "training", TRAIN_EPISODES, TRAIN_SEGMENTS, seed=1),
           "validation": write_split(root / "validation", VAL_EPISODES, VAL_SEGMENTS, seed=2)}
    return root, src


def datamodule(root, tmp_path, **kw) -> CalvinDataModule:
    kw = {"num_steps": NUM_STEPS, "batch_size": 2, "num_workers": 0,
          "stats_cache_dir": str(tmp_path / "stats"), **kw}
    dm = CalvinDataModule(str(root), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def windows(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def test_windows_match_source_frames(calvin, tmp_path, caplog):
    root, src = calvin
    with caplog.at_level(logging.WARNING, logger="datamodules.calvin"):
        dm = datamodule(root, tmp_path)
    assert "skipped 1 of 4 annotated segments shorter than 6 frames" in caplog.text
    assert dm.robot.state_dim == 7 and dm.robot.action_dim == 7 and dm.robot.gripper_state == "binary"
    assert dm.normalizer.mode == "identity"
    cases = (("training", dm._train, TRAIN_SEGMENTS[:3]), ("validation", dm._val, VAL_SEGMENTS))
    for split, ds, segments in cases:
        need = NUM_STEPS + 2
        # Seer's sampling: every start whose window and chunks lie inside the segment, nothing else.
        assert len(ds) == sum(b - a + 1 - need + 1 for a, b, _ in segments)
        used = set()
        for w in windows(ds):
            ep = ds.reader.episodes[int(w["episode_id"])]
            a, b, text = segments[ep.meta["annotation"]]
            assert w["instruction"] == text and ep.meta["start"] == a
            assert w["valid"].all() and w["action_valid"].all()
            assert w["images"].shape == (NUM_STEPS, 2, 3, 224, 224) and w["images"].dtype == torch.uint8
            for t in range(NUM_STEPS):
                f = a + int(w["frame_index"][t])
                assert a <= f and f + 2 <= b, "window and chunk labels stay inside the annotated segment"
                used.update((f, f + 1, f + 2))
                fr = src[split][f]
                assert torch.equal(w["images"][t, 0], resize_uint8(fr["rgb_static"][None], 224)[0])
                assert torch.equal(w["images"][t, 1], resize_uint8(fr["rgb_gripper"][None], 224)[0])
                obs = fr["robot_obs"].astype(np.float32)
                expected_state = np.concatenate([obs[:6], [(obs[14] + 1) / 2]])
                np.testing.assert_allclose(w["state"][t].numpy(), expected_state, rtol=0, atol=1e-6)
                for j in range(3):
                    rel = src[split][f + j]["rel_actions"].astype(np.float32)
                    np.testing.assert_allclose(w["actions"][t, j, :6].numpy(), rel[:6], rtol=0, atol=1e-6)
                    assert float(w["actions"][t, j, 6]) == (rel[6] + 1) / 2
        assert used == {f for a, b, _ in segments for f in range(a, b + 1)}
    batch = next(iter(dm.train_dataloader()))
    batch.validate(dm.robot, image_size=224, require_actions=True, max_steps=NUM_STEPS)


def test_packed_matches_raw_and_never_touches_the_source(calvin, tmp_path):
    root, _ = calvin
    before = snapshot(root)
    raw = datamodule(root, tmp_path)
    packed = datamodule(root, tmp_path, packed_dir=str(tmp_path / "pack"), build_pack=True)
    assert packed._train.reader.pack is not None and raw._train.reader.pack is None
    for a, b in ((raw._train, packed._train), (raw._val, packed._val)):
        assert a.index == b.index
        for wa, wb in zip(windows(a), windows(b)):
            for k in wa:
                assert (wa[k] == wb[k]) if k == "instruction" else torch.equal(wa[k], wb[k]), k
    pack = tmp_path / "pack" / "training"
    manifest = json.loads((pack / MANIFEST).read_text())
    ids = np.load(pack / "frame_ids.npy")
    assert ids.tolist() == sorted({f for a, b, _ in TRAIN_SEGMENTS for f in range(a, b + 1)})
    assert manifest["num_frames"] == len(ids) and manifest["static_shape"] == list(STATIC)
    assert np.load(pack / "static.npy", mmap_mode="r").shape == (len(ids), *STATIC)
    assert snapshot(root) == before, "reading or packing must not modify the dataset"
    # Workers get the reader pickled: memory maps must not travel with it (9 MB of images here).
    assert len(pickle.dumps(packed._train.reader)) < 100_000
    # A second run reuses the pack (no rebuild: same files, same mtimes).
    stamp = (pack / "static.npy").stat().st_mtime_ns
    datamodule(root, tmp_path, packed_dir=str(tmp_path / "pack"), build_pack=True)
    assert (pack / "static.npy").stat().st_mtime_ns == stamp
    assert [p.name for p in pack.parent.iterdir() if p.name.startswith(".")] == []


def test_pack_missing_or_stale(calvin, tmp_path):
    root, _ = calvin
    with pytest.raises(DataError, match=r"manifest.json: missing: no finished CALVIN pack"):
        datamodule(root, tmp_path, packed_dir=str(tmp_path / "pack"))
    pack_calvin(root / "validation", tmp_path / "pack" / "validation")
    pack_calvin(root / "training", tmp_path / "pack" / "training")
    manifest_path = tmp_path / "pack" / "training" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    with pytest.raises(DataError, match=r"fingerprint: pack was built from a different version"):
        datamodule(root, tmp_path, packed_dir=str(tmp_path / "pack"))
    dm = datamodule(root, tmp_path, packed_dir=str(tmp_path / "pack"), build_pack=True)  # rebuilds it
    assert dm._train.reader.pack.manifest["fingerprint"] == manifest["fingerprint"]
    for inside in (root / "training" / "pack", root / "pack"):
        with pytest.raises(ValueError, match="is inside the dataset"):
            pack_calvin(root / "training", inside)
    with pytest.raises(ValueError, match="build_pack=True needs packed_dir"):
        CalvinDataModule(str(root), build_pack=True)


def test_pack_build_is_atomic(tmp_path):
    split = tmp_path / "data" / "training"
    write_split(split, [(0, 11)], [(0, 11, "stack the blocks")])
    out = tmp_path / "packs" / "training"
    pack_calvin(split, out)
    good = snapshot(out)
    frame = split / "episode_0000007.npz"
    frame.write_bytes(frame.read_bytes()[:5000])  # a truncated download
    write_annotations(split, [(0, 11, "stack the blocks"), (0, 9, "changes the fingerprint")])
    with pytest.raises(DataError, match=r"episode_0000007.npz: file: unreadable or truncated"):
        pack_calvin(split, out)
    assert snapshot(out) == good, "a failed rebuild keeps the previous pack"
    assert sorted(p.name for p in out.parent.iterdir()) == ["training"], "no temporary directory left"
    with pytest.raises(DataError, match="truncated"):
        pack_calvin(split, tmp_path / "packs" / "fresh")
    assert not (tmp_path / "packs" / "fresh").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["training"]


def test_normalization_modes(calvin, tmp_path):
    root, _ = calvin
    dm = datamodule(root, tmp_path, normalization="minmax")
    norm = dm.normalizer
    assert norm.mode == "minmax" and norm.gripper_low == [-1.0] and norm.gripper_high == [1.0]
    assert norm.gripper_convention.startswith("1 = open")
    assert len(list((tmp_path / "stats").glob("stats-*.json"))) == 1
    assert datamodule(root, tmp_path, normalization="quantile").normalizer.mode == "quantile"
    with pytest.raises(ValueError, match="normalization must be one of"):
        CalvinDataModule(str(root), normalization="zscore")
    assert CalvinDataModule("/nonexistent/calvin").robot.action_dim == 7  # no data needed to wire a model


def test_annotations_written_by_numpy_1(tmp_path):
    """The released files were pickled by numpy 1.x, whose array classes live in ``numpy.core``."""
    split = tmp_path / "training"
    write_split(split, [(0, 11)], [(0, 11, "stack the blocks")])
    path = split / "lang_annotations" / "auto_lang_ann.npy"
    ann = np.load(path, allow_pickle=True)  # our own test file
    # numpy 1.x wrote object arrays with pickle protocol 3, whose GLOBAL opcodes hold module names as text.
    legacy = pickle.dumps(ann, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in legacy
    with open(path, "wb") as fp:
        np.lib.format.write_array_header_1_0(fp, {"descr": "|O", "fortran_order": False, "shape": ()})
        fp.write(legacy)
    assert [e.instruction for e in CalvinReader(split, num_steps=NUM_STEPS).episodes] == ["stack the blocks"]


# -- bad data ----------------------------------------------------------------------------------------------
def _frame(split: Path, f: int) -> Path:
    return split / f"episode_{f:07d}.npz"


def _rewrite(split: Path, f: int, **changes) -> None:
    with np.load(_frame(split, f)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez_compressed(_frame(split, f), **{k: v for k, v in arrays.items() if v is not None})


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless if it ever ran; the loader must refuse before calling it


def _evil_annotations(split: Path) -> None:
    path = split / "lang_annotations" / "auto_lang_ann.npy"
    with open(path, "wb") as fp:
        np.lib.format.write_array_header_1_0(fp, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(_Evil(), fp, protocol=3)


BAD = {
    "no ep_start_end_ids": (lambda s: (s / "ep_start_end_ids.npy").unlink(),
                            r"ep_start_end_ids.npy: file: missing"),
    "no annotations": (lambda s: (s / "lang_annotations" / "auto_lang_ann.npy").unlink(),
                       r"auto_lang_ann.npy: file: missing"),
    "pickle payload": (_evil_annotations, r"auto_lang_ann.npy: file: .*posix.getcwd is not allowed"),
    "ann count": (lambda s: _annotation_mismatch(s),
                  r"language/ann: 2 instructions for 1 segments"),
    "outside episodes": (lambda s: write_annotations(s, [(0, 11, "a"), (5, 20, "b")]),
                         r"auto_lang_ann.npy: info/indx\[1\]: segment \(5, 20\) is not inside any"),
    "all too short": (lambda s: write_annotations(s, [(0, 4, "a"), (6, 10, "b")]),
                      r"info/indx: no annotated segment has the 6 frames", None),
    "missing end frame": (lambda s: _frame(s, 11).unlink(),
                          r"episode_0000011.npz: file: missing frame file referenced by .*frames 0-11",
                          r"episode_0000011.npz: file: missing frame file"),
    "missing inner frame": (lambda s: _frame(s, 5).unlink(),
                            r"episode_0000005.npz: file: missing frame file"),
    "missing key": (lambda s: _rewrite(s, 5, rel_actions=None), r"episode_0000005.npz: rel_actions: missing"),
    "static dtype": (lambda s: _rewrite(s, 5, rgb_static=np.zeros(STATIC, np.float32)),
                     r"rgb_static: expected a uint8 HxWx3 image, got float32 \(200, 200, 3\)"),
    "static gray": (lambda s: _rewrite(s, 5, rgb_static=np.zeros(STATIC[:2], np.uint8)),
                    r"rgb_static: expected a uint8 HxWx3 image, got uint8 \(200, 200\)"),
    "wrist size": (lambda s: _rewrite(s, 5, rgb_gripper=np.zeros((64, 64, 3), np.uint8)),
                   r"rgb_gripper: expected \(84, 84, 3\) like the split's first frame"),
    "action shape": (lambda s: _rewrite(s, 5, rel_actions=np.zeros(6)),
                     r"rel_actions: expected a float vector of shape \(7,\), got float64 \(6,\)"),
    "obs nan": (lambda s: _rewrite(s, 5, robot_obs=np.r_[np.zeros(3), np.nan, np.zeros(11)]),
                r"episode_0000005.npz: robot_obs: contains NaN or inf at index \[3\]"),
    "action inf": (lambda s: _rewrite(s, 5, rel_actions=np.r_[np.inf, np.zeros(6)]),
                   r"rel_actions: contains NaN or inf at index \[0\]"),
    "truncated npz": (lambda s: _frame(s, 5).write_bytes(_frame(s, 5).read_bytes()[:3000]),
                      r"episode_0000005.npz: file: unreadable or truncated .npz \(BadZipFile"),
    "garbage npz": (lambda s: _frame(s, 5).write_bytes(b"not a zip at all" * 10),
                    r"episode_0000005.npz: file: unreadable or truncated"),
}


def _annotation_mismatch(split: Path) -> None:
    path = split / "lang_annotations" / "auto_lang_ann.npy"
    ann = np.load(path, allow_pickle=True).item()  # our own test file
    ann["language"]["ann"] = ["a", "b"]
    np.save(path, ann, allow_pickle=True)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_names_file_key_and_problem(tmp_path, case):
    split = tmp_path / "calvin" / "training"
    write_split(split, [(0, 11)], [(0, 11, "stack the blocks")])
    corrupt, message, *pack_message = BAD[case]
    pack_message = pack_message[0] if pack_message else message
    corrupt(split)
    before = snapshot(tmp_path / "calvin")
    with pytest.raises(DataError, match=message):
        reader = CalvinReader(split, num_steps=NUM_STEPS)
        for i, ep in enumerate(reader.episodes):
            reader.read(i, 0, ep.length)
    if pack_message is None:  # the pack holds every segment; window length only matters to the reader
        pack_calvin(split, tmp_path / "pack")
    else:
        with pytest.raises(DataError, match=pack_message):  # the pack builder validates the same way
            pack_calvin(split, tmp_path / "pack")
        assert not (tmp_path / "pack").exists()
    assert snapshot(tmp_path / "calvin") == before


def test_missing_split_dir(calvin, tmp_path):
    root, _ = calvin
    partial = tmp_path / "task_D_D"
    shutil.copytree(root / "training", partial / "training")
    with pytest.raises(DataError, match=r"validation: split directory: missing"):
        datamodule(partial, tmp_path)
    # A missing root is named as the config key, before the reader looks for its splits.
    with pytest.raises(DataError, match=r"nowhere: data.init_args.root: does not exist"):
        datamodule(tmp_path / "nowhere", tmp_path)
    with pytest.raises(DataError, match=r"training: split directory: missing.*missing too"):
        CalvinSplit(tmp_path / "nowhere" / "training")


# -- a `vitavla fit`-style run ------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_lightning_fit_on_calvin(calvin, tmp_path, stage):
    import lightning as L

    from teachers import SeerTeacher
    from vitavla.backbones.internvl import InternVLBackbone
    from vitavla.modules import DistillationModule, PolicyModule
    from vitavla.student import VLAStudent

    root, _ = calvin
    dm = CalvinDataModule(str(root), num_steps=NUM_STEPS, batch_size=2, num_workers=0,
                          stats_cache_dir=str(tmp_path / "stats"), packed_dir=str(tmp_path / "pack"),
                          build_pack=True)
    student = VLAStudent(InternVLBackbone(path="tiny", tokens_per_image=4), max_steps=NUM_STEPS)
    teacher = SeerTeacher(preset="tiny")
    module = (DistillationModule(student, teacher) if stage == "align"
              else PolicyModule(student, teacher, init_mode="only_finetune"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert all(torch.isfinite(v).all() for v in trainer.callback_metrics.values())
