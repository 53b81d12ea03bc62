"""Windows per second of each datamodule, per worker count, against what training consumes. One run.

    python benchmarks/loader_throughput.py                   # writes small datasets in the real layouts
    python benchmarks/loader_throughput.py --workers 0 2 --windows 96
    python benchmarks/loader_throughput.py --workers 2 --formats lerobot   # rows named "...lerobot..."
    python benchmarks/loader_throughput.py --cache-only --windows 2048     # cache_frames: file vs RAM

Datasets are written by the test suite's writers (real on-disk layouts and native image sizes: CALVIN
200x200 / 84x84 npz frames, LIBERO 128x128 HDF5, ALOHA 480x640 HDF5 raw and JPEG, LeRobot v3 mp4 at 224x224
and 480x640, AV1 as lerobot writes it by default (H.264 where PyAV has no AV1 encoder), GOP 2). Every window
is 10 steps x 2 views resized to 224, uint8. "tiny step" is measured here: one training step of
configs/tiny_align.yaml's model at batch 8. "paper step" cannot be measured on a CPU:
``--paper-step-seconds`` (default 1.0 s for one 7B ZeRO-2 step of 8 windows on one GPU, an estimate) sets it,
and the ratio is labelled as such.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.base import WindowDataModule  # noqa: E402

NUM_STEPS, BATCH = 10, 8


def calvin_dm(tmp: Path, packed: bool, workers: int) -> WindowDataModule:
    from datamodules.calvin import CalvinDataModule
    from tests.datamodules.test_calvin import write_split

    root = tmp / "calvin"
    if not root.exists():
        episodes, segments = [(0, 119)], [(0, 59, "open the drawer"), (60, 119, "push the block")]
        write_split(root / "training", episodes, segments)
        write_split(root / "validation", episodes, segments, seed=1)
    kw = dict(packed_dir=str(tmp / "calvin_packed"), build_pack=True) if packed else {}
    dm = CalvinDataModule(str(root), num_steps=NUM_STEPS, batch_size=BATCH, num_workers=workers,
                          stats_cache_dir=str(tmp / "stats"), **kw)
    dm.prepare_data()
    return dm


def libero_dm(tmp: Path, workers: int, **kw) -> WindowDataModule:
    from datamodules.libero import LiberoDataModule
    from tests.conftest import make_demo, write_libero

    path = tmp / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    if not path.exists():
        rng = np.random.default_rng(0)
        write_libero(path, {f"demo_{i}": make_demo(120, 128, rng) for i in range(3)})
    return LiberoDataModule(str(tmp / path.name), num_steps=NUM_STEPS, batch_size=BATCH, num_workers=workers,
                            stats_cache_dir=str(tmp / "stats"), val_fraction=0.0, **kw)


def aloha_dm(tmp: Path, compress: bool, workers: int) -> WindowDataModule:
    from datamodules.aloha import AlohaDataModule
    from tests.conftest import write_dataset

    root = tmp / f"aloha_{'jpeg' if compress else 'raw'}"
    if not root.exists():
        write_dataset(root, lengths=(60, 60), ids=(0, 1), compress=compress, hw=(480, 640))
    return AlohaDataModule(str(root), instruction="transfer the cube", num_steps=NUM_STEPS, batch_size=BATCH,
                           num_workers=workers, stats_cache_dir=str(tmp / "stats"), val_fraction=0.0)


def lerobot_dm(tmp: Path, hw: tuple[int, int], workers: int) -> WindowDataModule:
    from datamodules.lerobot import LeRobotDataModule
    from datamodules.lerobot_write import LeRobotWriter
    from tests.conftest import episode_arrays

    root = tmp / f"lerobot_{hw[0]}x{hw[1]}"
    if not root.exists():
        w = LeRobotWriter(root, 50, 14, 14, ["cam_high", "cam_left_wrist"], robot_type="aloha")
        for seed in range(2):
            a = episode_arrays(60, hw=hw, cams=("cam_high", "cam_left_wrist"), seed=seed)
            w.add_episode(a["qpos"].astype(np.float32), a["action"].astype(np.float32), a["images"],
                          "transfer")
        w.finish()
    return LeRobotDataModule(str(root), static_camera="cam_high", wrist_camera="cam_left_wrist", arm_dim=12,
                             action_columns=[0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 6, 13],
                             num_steps=NUM_STEPS,
                             batch_size=BATCH, num_workers=workers, stats_cache_dir=str(tmp / "stats"),
                             val_fraction=0.0)


def windows_per_second(dm: WindowDataModule, windows: int) -> float:
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up and file opening are not throughput
    seen, start = 0, time.perf_counter()
    while seen < windows:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        assert batch.images.dtype == torch.uint8
        seen += batch.batch_size
    return seen / (time.perf_counter() - start)


def cached_rates(tmp: Path, windows: int) -> dict[str, float]:
    """``cache_frames`` at the quickstart's shapes (LIBERO HDF5, 56 px frames read at 56 px, windows of 4
    steps, batch 64, main process): windows/s read from the file, from RAM one window at a time, and from RAM
    a batch at a time (``WindowDataset.__getitems__``)."""
    from datamodules.libero import LiberoDataModule
    from tests.conftest import make_demo, write_libero

    path = tmp / "cached" / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    write_libero(path, {f"demo_{i}": make_demo(150, 56, rng) for i in range(4)})

    def dm(cache: bool) -> LiberoDataModule:
        return LiberoDataModule(str(path), num_steps=4, image_size=56, batch_size=64, num_workers=0,
                                stats_cache_dir=str(tmp / "stats"), val_fraction=0.0, cache_frames=cache)
    rates = {"file": windows_per_second(dm(False), windows)}
    cached = dm(True)
    cached.setup("fit")
    cached._train._batched = False  # the per-window path the batch gather replaces
    rates["RAM, per window"] = windows_per_second(cached, windows)
    cached._train._batched = True
    rates["RAM, per batch"] = windows_per_second(cached, windows)
    return rates


def tiny_step_seconds() -> float:
    from datamodules.synthetic import SyntheticWindowDataModule
    from teachers.seer import SeerTeacher
    from vitavla.backbones import InternVLBackbone
    from vitavla.modules import DistillationModule
    from vitavla.student import VLAStudent

    module = DistillationModule(VLAStudent(InternVLBackbone(path="tiny", tokens_per_image=4), max_steps=NUM_STEPS),
                                SeerTeacher(preset="tiny"))
    data = SyntheticWindowDataModule(num_episodes=2, episode_length=12, num_steps=NUM_STEPS, batch_size=BATCH,
                                     val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        loss = module.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--windows", type=int, default=64, help="windows timed per measurement")
    ap.add_argument("--paper-step-seconds", type=float, default=1.0)
    ap.add_argument("--formats", nargs="+", default=[""], help="only rows whose name contains one of these")
    ap.add_argument("--cache-only", action="store_true",
                    help="only the cache_frames comparison (file vs RAM per window vs RAM per batch)")
    args = ap.parse_args()
    if args.cache_only:
        with tempfile.TemporaryDirectory() as d:
            rates = cached_rates(Path(d), args.windows)
        print(f"{'libero 56px, 4 steps, b64':<28}{'windows/s':>10}{'x file':>8}")
        for name, rate in rates.items():
            print(f"{name:<28}{rate:>10.1f}{rate / rates['file']:>8.2f}")
        print(f"per batch / per window: {rates['RAM, per batch'] / rates['RAM, per window']:.2f}x")
        return
    tiny = tiny_step_seconds()
    consume_tiny, consume_paper = BATCH / tiny, BATCH / args.paper_step_seconds
    print(f"tiny config step: {tiny * 1e3:.0f} ms for {BATCH} windows -> consumes {consume_tiny:.1f} windows/s")
    print(f"paper config step (assumed {args.paper_step_seconds:.2f} s): consumes {consume_paper:.1f} windows/s")
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        makers = {
            "calvin raw npz": lambda w: calvin_dm(tmp, False, w),
            "calvin packed": lambda w: calvin_dm(tmp, True, w),
            "libero hdf5 128px": lambda w: libero_dm(tmp, w),
            "aloha raw 480x640": lambda w: aloha_dm(tmp, False, w),
            "aloha jpeg 480x640": lambda w: aloha_dm(tmp, True, w),
            "lerobot mp4 224px": lambda w: lerobot_dm(tmp, (224, 224), w),
            "lerobot mp4 480x640": lambda w: lerobot_dm(tmp, (480, 640), w),
        }
        makers = {k: v for k, v in makers.items() if any(f in k for f in args.formats)}
        print(f"\n{'format':<20}{'workers':>8}{'windows/s':>11}{'x tiny':>9}{'x paper':>9}")
        for name, make in makers.items():
            for w in args.workers:
                rate = windows_per_second(make(w), args.windows)
                rows[(name, w)] = rate
                print(f"{name:<20}{w:>8}{rate:>11.1f}{rate / consume_tiny:>9.2f}{rate / consume_paper:>9.2f}")
    for w in args.workers if ("calvin packed", args.workers[0]) in rows else []:
        print(f"packed / raw CALVIN at {w} workers: {rows[('calvin packed', w)] / rows[('calvin raw npz', w)]:.2f}x "
              f"(goal >= 5x)")


if __name__ == "__main__":
    main()
