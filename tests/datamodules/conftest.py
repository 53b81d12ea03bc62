"""Builders shared by the datamodule tests: CALVIN splits and a LIBERO suite in the exact on-disk layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.libero import LiberoDataModule
from tests.conftest import make_demo, write_libero


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every datamodule test runs single-threaded (see tests/conftest.py: one_thread)."""


# CALVIN splits as the official release lays them out: the CALVIN, check, fit-format and LeRobot tests.
STATIC, WRIST = (200, 200, 3), (84, 84, 3)  # the real native sizes


def write_split(split_dir: Path, episodes, segments, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """A CALVIN split as the official release lays it out; returns the arrays of every frame by frame id."""
    rng = np.random.default_rng(seed)
    split_dir.mkdir(parents=True)
    src = {}
    for a, b in episodes:
        for f in range(a, b + 1):
            obs = rng.normal(size=15)
            obs[14] = rng.choice([-1.0, 1.0])
            rel = np.concatenate([rng.uniform(-1, 1, 6), [rng.choice([-1.0, 1.0])]])
            fr = {"rgb_static": rng.integers(0, 256, STATIC, dtype=np.uint8),
                  "rgb_gripper": rng.integers(0, 256, WRIST, dtype=np.uint8),
                  "robot_obs": obs, "rel_actions": rel, "actions": rng.normal(size=7),
                  "scene_obs": np.zeros(24)}
            np.savez_compressed(split_dir / f"episode_{f:07d}.npz", **fr)
            src[f] = fr
    np.save(split_dir / "ep_start_end_ids.npy", np.asarray(episodes, dtype=np.int64))
    write_annotations(split_dir, segments)
    return src


def write_annotations(split_dir: Path, segments) -> None:
    """CALVIN's lang_annotations/auto_lang_ann.npy for ``segments`` of (start, end, instruction)."""
    n = len(segments)
    ann = {"language": {"ann": [t for *_, t in segments], "task": ["some_task"] * n,
                        "emb": np.zeros((n, 1, 384), np.float32)},
           "info": {"episodes": [], "indx": [(np.int64(a), b) for a, b, _ in segments]}}
    (split_dir / "lang_annotations").mkdir(exist_ok=True)
    np.save(split_dir / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)  # as CALVIN does


# A LIBERO suite of two task files: the LIBERO and resume tests.
KITCHEN = "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it_demo.hdf5"
LIVING = "LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket_demo.hdf5"
KITCHEN_TEXT = "Turn on the stove and put the moka pot on it"  # problem_info wins over the file name
LIVING_TEXT = "put both the alphabet soup and the tomato sauce in the basket"  # from the file name


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Two task files: 128px with ee_states and problem_info; 256px no-noops style with ee_pos + ee_ori and
    demo numbers that sort differently as strings (demo_1, demo_9, demo_10)."""
    root = tmp_path_factory.mktemp("libero_10")
    rng = np.random.default_rng(0)
    kitchen = {f"demo_{i}": make_demo(n, 128, rng) for i, n in enumerate((14, 12))}
    living = {f"demo_{i}": make_demo(n, 256, rng) for i, n in zip((10, 9, 1), (16, 13, 20))}
    info = {"language_instruction": KITCHEN_TEXT, "problem_name": "libero_kitchen_tabletop"}
    write_libero(root / KITCHEN, kitchen, problem_info=json.dumps(info))
    write_libero(root / LIVING, living, split_ee=True)
    # Episode order: files sorted by name, demos numerically.
    source = [kitchen["demo_0"], kitchen["demo_1"], living["demo_1"], living["demo_9"], living["demo_10"]]
    return root, source


def libero_datamodule(root, tmp_path, **kw) -> LiberoDataModule:
    """A LiberoDataModule on ``root``: 4 steps, 64 px, batches of 2, statistics cached under ``tmp_path``."""
    args = dict(num_steps=4, image_size=64, batch_size=2, num_workers=0, val_fraction=0.2,
                stats_cache_dir=str(tmp_path / "stats"))  # never the user's ~/.cache
    return LiberoDataModule(str(root), **{**args, **kw})
