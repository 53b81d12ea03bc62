"""Settings and builders shared by every test package (a package's own builders live in its conftest.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from vitavla.action_head import ActionHead
from vitavla.batch import RobotSpec, fake_window
from vitavla.policy import VLAPolicy
from vitavla.student import ActionMapper, VLAStudent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation cost on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def libero_demo(tmp_path_factory):
    """One scripted LIBERO demo (libero_object task 0, 32 px), recorded once per session and shared by the
    simulator tests that need one; returns (GenConfig, TaskResult). Skips without LIBERO."""
    pytest.importorskip("libero.libero")
    from vitavla.demos.libero_scripted import GenConfig, generate

    cfg = GenConfig(suite="libero_object", tasks=(0,), episodes=1, max_attempts=2,
                    out=str(tmp_path_factory.mktemp("libero_demo")), image_size=32, max_steps=200,
                    settle_steps=1, progress=False)
    (res,) = generate(cfg, log=lambda msg: None)
    return cfg, res


# Tiny students and windows: the student, streaming and module tests and the rollout tests build them.
IMAGE_SIZE = 224


def tiny_backbone(family: str, tokens_per_image: int = 4):
    if family == "internvl":
        from vitavla.backbones.internvl import InternVLBackbone

        return InternVLBackbone(path="tiny", tokens_per_image=tokens_per_image, image_size=IMAGE_SIZE)
    from vitavla.backbones.llava import LlavaBackbone

    return LlavaBackbone(path="tiny", tokens_per_image=tokens_per_image, image_size=IMAGE_SIZE)


def tiny_policy(family: str = "internvl", teacher_width: int = 32, **student_kw) -> VLAPolicy:
    student = VLAStudent(tiny_backbone(family), **student_kw).eval()
    head = ActionHead(teacher_width, student.robot.arm_dim, student.robot.gripper_dim)
    return VLAPolicy(student, ActionMapper(student.hidden_size, teacher_width), head).eval()


def window(robot: RobotSpec | None = None, batch_size: int = 2, num_steps: int = 4, seed: int = 0, **kw):
    return fake_window(robot or RobotSpec(), batch_size=batch_size, num_steps=num_steps, image_size=IMAGE_SIZE,
                       generator=torch.Generator().manual_seed(seed), **kw)


# LIBERO demonstration files in the exact HDF5 layout: the reader tests, the fit and rollout tests and the
# loader benchmark write them.
def make_demo(length: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Source arrays of one demo with LIBERO's dtypes: uint8 images, float64 low-dim data and actions."""
    grip = np.where(np.arange(length) < length // 2, -1.0, 1.0)  # open, then close halfway
    return {
        "agentview_rgb": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
        "eye_in_hand_rgb": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
        "ee_states": rng.normal(size=(length, 6)),
        "gripper_states": rng.uniform(-0.04, 0.04, (length, 2)),
        "joint_states": rng.normal(size=(length, 7)),
        "actions": np.concatenate([rng.uniform(-0.9, 0.9, (length, 6)), grip[:, None]], axis=1),
    }


def write_libero(path: Path, demos: dict[str, dict[str, np.ndarray]], split_ee: bool = False,
                 problem_info: str | None = None) -> None:
    """``data/demo_N/{actions, obs/...}``; ``split_ee`` writes ee_pos + ee_ori like some regenerated files."""
    with h5py.File(path, "w") as h:
        data = h.create_group("data")
        if problem_info is not None:
            data.attrs["problem_info"] = problem_info
        data.attrs["num_demos"] = len(demos)
        for name, arrays in demos.items():
            g = data.create_group(name)
            g.create_dataset("actions", data=arrays["actions"])
            g.create_dataset("dones", data=np.zeros(len(arrays["actions"]), np.uint8))
            obs = g.create_group("obs")
            for key, value in arrays.items():
                if key == "actions":
                    continue
                if key == "ee_states" and split_ee:
                    obs.create_dataset("ee_pos", data=value[:, :3])
                    obs.create_dataset("ee_ori", data=value[:, 3:])
                else:
                    obs.create_dataset(key, data=value)


# ALOHA / act-plus-plus episodes in the exact HDF5 layout: the reader, config, bimanual-teacher and LeRobot
# tests and the loader benchmark write them.
CAMS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")  # act-plus-plus order, not alphabetical


def episode_arrays(t: int, width: int = 14, hw=(48, 64), cams=CAMS, seed: int = 0) -> dict:
    """Smooth joint trajectories, gripper widths in [0, 0.04] and smooth, camera-distinct colour images."""
    rng = np.random.default_rng(seed)
    steps = np.arange(t)[:, None]
    qpos = 0.8 * np.sin(0.3 * steps + np.arange(width) + seed) + rng.normal(0, 0.01, (t, width))
    for g in range(6, width, 7):
        qpos[:, g] = 0.02 + 0.02 * np.cos(0.4 * steps[:, 0] + g + seed)
    action = qpos + rng.normal(0, 0.05, qpos.shape)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    images = {}
    for c, cam in enumerate(cams):
        frames = np.empty((t, *hw, 3), np.uint8)
        for i in range(t):  # R: x ramp, G: y ramp, B: camera constant, so a channel swap shows
            frames[i, ..., 0] = np.clip(xx * 200 / hw[1] + 3 * i + seed, 0, 255)
            frames[i, ..., 1] = np.clip(yy * 180 / hw[0] + 20 * c, 0, 255)
            frames[i, ..., 2] = 30 + 50 * c
        images[cam] = frames
    return {"qpos": qpos, "action": action, "images": images}


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=50)
    return out.getvalue()


def write_episode(path, arrays: dict, compress: bool = False, attrs: dict | None = None) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["sim"], f.attrs["compress"] = False, compress
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        obs = f.create_group("observations")
        obs["qpos"], obs["qvel"] = arrays["qpos"], np.zeros_like(arrays["qpos"])
        f["action"] = arrays["action"]
        img = obs.create_group("images")
        if not compress:
            for cam, fr in arrays["images"].items():
                img.create_dataset(cam, data=fr, chunks=(1, *fr.shape[1:]))
            return
        # cv2.imencode(arr) reads arr as BGR: equivalent to an RGB encoder given arr[..., ::-1].
        enc = {cam: [jpeg(fr[..., ::-1]) for fr in frs] for cam, frs in arrays["images"].items()}
        padded = max(len(b) for bs in enc.values() for b in bs)
        for cam, bs in enc.items():
            buf = np.zeros((len(bs), padded), np.uint8)
            for i, b in enumerate(bs):
                buf[i, : len(b)] = np.frombuffer(b, np.uint8)
            img.create_dataset(cam, data=buf, chunks=(1, padded))
        lengths = [[len(b) for b in bs] for bs in enc.values()]
        f.create_dataset("compress_len", data=np.array(lengths, np.float32))  # float, like act-plus-plus
        arrays["jpeg"] = enc


def write_dataset(root, lengths=(9, 10, 11), ids=(0, 2, 10), compress=False, **kw) -> list[dict]:
    """Episodes numbered so that numeric and lexicographic order differ (0, 2, 10)."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (i, t) in enumerate(zip(ids, lengths)):
        arrays = episode_arrays(t, seed=n, **kw)
        write_episode(root / f"episode_{i}.hdf5", arrays, compress)
        out.append(arrays)
    return out


# Short `vitavla fit` runs: the CLI, config-format, bf16 and LoRA tests and the LIBERO end-to-end test.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]
# FAST on the tiny configs' synthetic data, cut to 4 episodes of 6 steps.
FAST_SYNTHETIC = [*FAST, "--data.init_args.num_episodes=4", "--data.init_args.episode_length=6"]
# Stage 2 from scratch: no stage-1 checkpoint to load.
ONLY_FINETUNE = ["--model.init_args.init_mode=only_finetune", "--model.init_args.init_from=null"]


def fit(config: str, root: Path, *extra: str) -> Path:
    """`vitavla fit` of ``configs/<config>`` with FAST_SYNTHETIC into ``root``; returns its last.ckpt."""
    from cli import main  # here, not at the top: most test modules never load the command

    main(["fit", "--config", str(CONFIGS / config), f"--trainer.default_root_dir={root}",
          f"--trainer.logger.init_args.save_dir={root}", *FAST_SYNTHETIC, *extra])
    ckpts = sorted(root.glob("version_*/checkpoints/last.ckpt"))
    assert ckpts, f"no checkpoint under {root}"
    return ckpts[-1]


def libero_fit_yaml(tmp: Path) -> str:
    """The data (and matching model) section of a 2-step LIBERO fit on 3 random demos under ``tmp``."""
    rng = np.random.default_rng(0)
    path = tmp / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    write_libero(path, {f"demo_{i}": make_demo(10, 128, rng) for i in range(3)})
    return f"""data:
  class_path: datamodules.LiberoDataModule
  init_args: {{root: {path}, num_steps: 4, batch_size: 2, num_workers: 0, val_fraction: 0.34,
              stats_cache_dir: {tmp / 'stats'}, gripper_state: width}}
model:
  init_args:
    student: {{init_args: {{gripper_state: width, gripper_state_dim: 2}}}}
    teacher: {{init_args: {{overrides: {{gripper_width: true}}}}}}
"""
