"""LeRobotDataset v3: the reader on datasets written here in the published layout, and the converter
(`vitavla data check` on broken copies is in test_lerobot_check.py)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from datamodules.base import DataError, resize_uint8  # noqa: E402
from datamodules.lerobot import LeRobotDataModule, LeRobotReader  # noqa: E402
from datamodules.lerobot_write import LeRobotWriter, VideoOptions  # noqa: E402
from datamodules.normalization import Normalizer  # noqa: E402
from tests.datamodules.lerobot_data import (  # noqa: E402
    ALOHA_COLUMNS, AV1, FPS, H264, LOSSLESS, frames, reader, write)


def test_layout_is_lerobot_v3(tmp_path):
    root = tmp_path / "ds"
    write(root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                     "meta/episodes/chunk-000/file-000.parquet", "meta/info.json", "meta/stats.json",
                     "meta/tasks.parquet",
                     "videos/observation.images.top/chunk-000/file-000.mp4",
                     "videos/observation.images.top/chunk-000/file-001.mp4",
                     "videos/observation.images.wrist/chunk-000/file-000.mp4",
                     "videos/observation.images.wrist/chunk-000/file-001.mp4"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS and info["total_episodes"] == 3
    assert info["total_frames"] == 24 and info["total_tasks"] == 2 and info["chunks_size"] == 1000
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert info["features"]["observation.images.top"]["shape"] == [32, 48, 3]
    assert info["features"]["action"] == {"dtype": "float32", "shape": [7],
                                          "names": [f"action_{i}" for i in range(7)]}
    data = pq.read_table(root / "data/chunk-000/file-001.parquet")
    assert set(data.column_names) == {"observation.state", "action", "timestamp", "frame_index",
                                      "episode_index", "index", "task_index"}
    assert data.column("episode_index").to_pylist() == [2] * 8
    assert data.column("index").to_pylist() == list(range(16, 24))  # global rows continue across files
    assert data.column("timestamp").to_pylist() == pytest.approx([i / FPS for i in range(8)])
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == [7, 9, 8] and [e["tasks"] for e in eps][1] == ["open the drawer"]
    assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in eps] == [(0, 7), (7, 16), (16, 24)]
    assert [e["data/file_index"] for e in eps] == [0, 0, 1]
    # Two episodes share the first mp4: the second starts where the first ends.
    assert [e["videos/observation.images.top/from_timestamp"] for e in eps] == pytest.approx([0.0, 0.7, 0.0])
    assert [e["videos/observation.images.top/to_timestamp"] for e in eps] == pytest.approx([0.7, 1.6, 0.8])
    assert eps[0]["stats/action/min"] == pytest.approx(np.min(pq.read_table(
        root / "data/chunk-000/file-000.parquet").column("action").to_pylist()[:7], 0).tolist())
    # lerobot reads tasks.parquet with pandas and needs the task text back as the frame's index.
    pandas_meta = json.loads(pq.read_schema(root / "meta/tasks.parquet").metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]
    tasks = pq.read_table(root / "meta/tasks.parquet").to_pylist()
    assert tasks == [{"task_index": 0, "task": "pick up the cup"},
                     {"task_index": 1, "task": "open the drawer"}]


def _codec_params():
    out = [pytest.param(LOSSLESS, 0, id="h264-lossless"), pytest.param(H264, 12, id="h264-yuv420p")]
    missing = "libsvtav1" not in av.codecs_available or "libdav1d" not in av.codecs_available and \
        "libaom-av1" not in av.codecs_available
    skip = pytest.mark.skipif(missing, reason="no AV1 codec in PyAV")
    out.append(pytest.param(AV1, 12, id="av1", marks=skip))
    return out


@pytest.mark.parametrize("video,tol", _codec_params())
def test_decoded_frames_equal_frames_written(tmp_path, video, tol):
    src = write(tmp_path / "ds", video=video, hw=(64, 64))
    r = reader(tmp_path / "ds")
    assert [e.instruction for e in r.episodes] == ["pick up the cup", "open the drawer", "pick up the cup"]
    for e, ep in enumerate(src):
        t = len(ep["state"])
        # Whole episodes, and ranges starting between keyframes and late in a shared file (seek + decode on).
        for start, stop in ((0, t), (3, 6), (t - 1, t), (1, 2)):
            fr = r.read(e, start, stop)
            for got, want in ((fr.static, ep["images"]["top"]), (fr.wrist, ep["images"]["wrist"])):
                diff = np.abs(got.astype(int) - want[start:stop].astype(int))
                assert got.dtype == np.uint8 and got.shape == want[start:stop].shape
                assert diff.max() <= tol, (e, start, stop, diff.max())
                if tol:
                    assert diff.mean() < 2.0
            np.testing.assert_array_equal(fr.state, ep["state"][start:stop])
            np.testing.assert_array_equal(fr.action, ep["action"][start:stop])
    # A reader travels to spawned workers pickled, without its open containers.
    clone = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(clone.read(1, 2, 4).static, r.read(1, 2, 4).static)


def test_windows_columns_and_normalizer_from_the_training_split(tmp_path):
    src = write(tmp_path / "ds", lengths=(6, 8, 7, 9), width=14,
                tasks=["fold", "fold", "stack", "fold"])
    dm = LeRobotDataModule(str(tmp_path / "ds"), static_camera="top", wrist_camera="wrist", arm_dim=12,
                           action_columns=ALOHA_COLUMNS, num_steps=4, image_size=24, batch_size=2,
                           num_workers=0, val_fraction=0.25, stats_cache_dir=str(tmp_path / "cache"))
    (tmp_path / "ds/meta/stats.json").write_text("not read unless asked")  # stats.json is opt-in
    dm.setup("fit")
    assert dm.robot.arm_dim == 12 and dm.robot.gripper_dim == 2 and dm.robot.state_dim == 14
    train = dm.split_episodes(dm.reader("train"), "train")
    assert len(train) == 3 and dm._val.index[0][0] not in train
    fitted = Normalizer.fit(np.concatenate([src[e]["action"][:, ALOHA_COLUMNS] for e in train]), 12)
    assert dm.normalizer.arm_low == pytest.approx(fitted.arm_low)
    assert dm.normalizer.gripper_high == pytest.approx(fitted.gripper_high)
    ds = dm._train
    for i in (0, len(ds) - 1):
        w, (e, start) = ds[i], ds.index[i]
        ep, n = src[e], min(len(src[e]["state"]) - start, 4)
        assert w["instruction"] == ep["task"]
        np.testing.assert_array_equal(w["state"][:n].numpy(), ep["state"][start:start + n][:, ALOHA_COLUMNS])
        raw = torch.from_numpy(ep["action"][start:start + n][:, ALOHA_COLUMNS])
        torch.testing.assert_close(w["actions"][:n, 0], dm.normalizer.normalize_actions(raw))
        want = resize_uint8(ep["images"]["top"][start:start + n], 24)
        assert w["images"].dtype == torch.uint8 and torch.equal(w["images"][:n, 0], want)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (2, 4, 2, 3, 24, 24)


def test_stats_json_when_asked(tmp_path):
    src = write(tmp_path / "ds")
    dm = LeRobotDataModule(str(tmp_path / "ds"), static_camera="top", wrist_camera="wrist",
                           use_stats_json=True, num_steps=3, image_size=16, num_workers=0,
                           normalize_state=True,
                           stats_cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    every = np.concatenate([ep["action"] for ep in src])  # stats.json covers every episode
    assert dm.normalizer.arm_low == pytest.approx(every[:, :6].min(0).tolist())
    assert dm.normalizer.gripper_high == pytest.approx(every[:, 6:].max(0).tolist())
    states = np.concatenate([ep["state"] for ep in src])
    assert dm.normalizer.state_mean == pytest.approx(states.mean(0).tolist(), abs=1e-6)
    assert not (tmp_path / "cache").exists()  # nothing fitted, nothing cached


# -- vitavla data convert --to lerobot: the converted dataset gives the source's windows --------------------

def _same_windows(src_dm, dst_dm, image_tol: int) -> None:
    src_dm.setup("fit")
    dst_dm.setup("fit")
    assert dst_dm.robot == src_dm.robot
    src_r, dst_r = src_dm.reader("train"), dst_dm.reader("train")
    for e, ep in enumerate(src_r.episodes):  # raw vectors: exact (the source's float32 values, kept float32)
        a, b = src_r.read(e, 0, ep.length), dst_r.read(e, 0, ep.length)
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.action, b.action)
    # The source fitted its statistics on float64 actions (HDF5), the copy on float32 ones.
    na, nb = src_dm.normalizer.state_dict(), dst_dm.normalizer.state_dict()
    for key in ("arm_low", "arm_high", "gripper_low", "gripper_high"):
        assert nb[key] == pytest.approx(na[key], rel=1e-6, abs=1e-7), key
    assert nb["gripper_convention"] == na["gripper_convention"] and nb["mode"] == na["mode"]
    for split in ("_train", "_val"):
        a, b = getattr(src_dm, split), getattr(dst_dm, split)
        assert a.index == b.index and len(a) > 0
        for i in range(len(a)):
            wa, wb = a[i], b[i]
            assert wa["instruction"] == wb["instruction"]
            for key in ("state", "valid", "action_valid", "frame_index", "episode_id"):
                assert torch.equal(wa[key], wb[key]), (split, i, key)
            torch.testing.assert_close(wa["actions"], wb["actions"], rtol=0, atol=1e-6)
            diff = (wa["images"].int() - wb["images"].int()).abs()
            assert diff.max() <= image_tol, (split, i, diff.max())


def test_convert_libero_round_trip(tmp_path, capsys):
    from cli import main
    from datamodules.libero import LiberoDataModule
    from tests.conftest import make_demo, write_libero

    rng = np.random.default_rng(0)
    path = tmp_path / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    write_libero(path, {f"demo_{i}": make_demo(n, 32, rng) for i, n in enumerate((6, 8, 5))})
    out = tmp_path / "libero_lerobot"
    # Noise images (make_demo) leave a lossy codec nothing to work with: lossless H.264 shows exactness.
    main(["data", "convert", str(path), "--format", "libero", "--to", "lerobot", "--out", str(out),
          "--vcodec", "libx264rgb", "--pix-fmt", "rgb24", "--crf", "0", "--episodes-per-file", "2"])
    printed = capsys.readouterr().out
    assert "wrote 3 episodes" in printed and "gripper_range: [-1.0, 1.0]" in printed
    assert not (tmp_path / "libero_lerobot.partial").exists()
    common = dict(num_steps=4, image_size=32, batch_size=2, num_workers=0, val_fraction=0.34)
    src = LiberoDataModule(str(path), stats_cache_dir=str(tmp_path / "c1"), **common)
    dst = LeRobotDataModule(str(out), static_camera="image", wrist_camera="wrist_image", arm_dim=6,
                            gripper_range=[-1.0, 1.0],
                            gripper_convention=src.make_reader("train").gripper_convention,
                            stats_cache_dir=str(tmp_path / "c2"), **common)
    _same_windows(src, dst, image_tol=0)
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        main(["data", "convert", str(path), "--format", "libero", "--to", "lerobot", "--out", str(out)])


def test_convert_aloha_bimanual_round_trip(tmp_path):
    from cli import main
    from datamodules.aloha import AlohaDataModule
    from tests.conftest import write_dataset

    write_dataset(tmp_path / "aloha", lengths=(6, 7, 5), ids=(0, 1, 2), hw=(32, 48))
    out = tmp_path / "aloha_lerobot"
    opts = ["--option", "arms=both", "--option", "wrist_camera=cam_left_wrist", "--option",
            "instruction=fold"]
    main(["data", "convert", str(tmp_path / "aloha"), "--format", "aloha", "--to", "lerobot", "--out",
          str(out),
          "--crf", "10", *opts])  # the default codec (AV1 where PyAV has it, else H.264), yuv420p
    common = dict(num_steps=4, image_size=32, batch_size=2, num_workers=0, val_fraction=0.34)
    src = AlohaDataModule(str(tmp_path / "aloha"), arms="both", wrist_camera="cam_left_wrist",
                          instruction="fold", stats_cache_dir=str(tmp_path / "c1"), **common)
    dst = LeRobotDataModule(str(out), static_camera="cam_high", wrist_camera="cam_left_wrist", arm_dim=12,
                            gripper_convention=src.make_reader("train").gripper_convention,
                            stats_cache_dir=str(tmp_path / "c2"), **common)
    _same_windows(src, dst, image_tol=10)
    info = json.loads((out / "meta/info.json").read_text())
    assert info["fps"] == 50 and info["robot_type"] == "aloha"
    assert sorted(k for k, v in info["features"].items() if v["dtype"] == "video") == [
        "observation.images.cam_high", "observation.images.cam_left_wrist"]


# -- configs/*_lerobot.yaml and `vitavla fit` on a LeRobot dataset ------------------------------------------

LEROBOT_CONFIGS = [f"{stage}_{robot}_lerobot" for robot in ("piper", "aloha")
                   for stage in ("teacher", "align", "finetune")]


@pytest.mark.parametrize("name", LEROBOT_CONFIGS)
def test_lerobot_configs_name_the_robot_of_their_data(name, tmp_path):
    import yaml

    from tests.conftest import CONFIGS

    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    data = cfg["data"]
    assert data["class_path"] == "datamodules.LeRobotDataModule"
    args = dict(data["init_args"])
    width = 14 if "aloha" in name else 7
    cams = [args["static_camera"].split(".")[-1], args["wrist_camera"].split(".")[-1]]
    w = LeRobotWriter(tmp_path / "ds", FPS, width, width, cams, video=LOSSLESS)
    w.add_episode(np.zeros((2, width), np.float32), np.zeros((2, width), np.float32),
                  {c: frames(2) for c in cams}, "task")
    w.finish()
    keep = ("static_camera", "wrist_camera", "arm_dim", "action_columns", "state_columns")
    robot = LeRobotReader(tmp_path / "ds", **{k: v for k, v in args.items() if k in keep}).robot
    model = cfg["model"]["init_args"]
    over = model["teacher"]["init_args"]["overrides"]
    assert (over["arm_dim"], over["gripper_dim"], over["gripper_state_dim"]) == (
        robot.arm_dim, robot.gripper_dim, robot.gripper_state_values) == (
        (12, 2, 2) if width == 14 else (6, 1, 1))
    from teachers import SeerConfig
    from teachers.seer.teacher import robot_spec

    t = model["teacher"]["init_args"]  # the Seer these settings build reports the data's robot
    seer = robot_spec(SeerConfig.preset(t["preset"], **t["overrides"]))
    assert (seer.arm_dim, seer.gripper_dim, seer.gripper_state, seer.gripper_state_values) == (
        robot.arm_dim, robot.gripper_dim, "width", robot.gripper_state_values)
    if "student" in model:
        s = model["student"]["init_args"]
        assert (s["arm_dim"], s["gripper_dim"], s["gripper_state"], s["gripper_state_dim"]) == (
            robot.arm_dim, robot.gripper_dim, "width", robot.gripper_state_values)


@pytest.mark.parametrize("robot", ["piper", "aloha"])
def test_lerobot_configs_chain_their_checkpoints_and_data(robot):
    import yaml

    from tests.conftest import CONFIGS

    teacher, align, finetune = (yaml.safe_load((CONFIGS / f"{s}_{robot}_lerobot.yaml").read_text())
                                for s in ("teacher", "align", "finetune"))
    export = (f"{teacher['trainer']['default_root_dir']}/version_0/"
              f"{teacher['model']['init_args']['export_path']}")
    for cfg in (align, finetune):
        assert cfg["model"]["init_args"]["teacher"]["init_args"]["checkpoint"] == export
    assert finetune["model"]["init_args"]["init_from"] == (
        f"{align['trainer']['default_root_dir']}/version_0/checkpoints/last.ckpt")
    assert align["model"]["init_args"]["student"] == finetune["model"]["init_args"]["student"]
    # Same episodes, layout and normalization for all three stages (the teacher's windows are S + 3 long).
    layout = [{k: v for k, v in c["data"]["init_args"].items() if k not in ("num_steps", "batch_size")}
              for c in (teacher, align, finetune)]
    assert layout[0] == layout[1] == layout[2]
    assert teacher["data"]["init_args"]["num_steps"] == align["data"]["init_args"]["num_steps"] + 3


def test_fit_both_stages_on_lerobot(tmp_path):
    from cli import main
    from tests.conftest import CONFIGS, FAST

    write(tmp_path / "ds", lengths=(9, 10, 11))  # PiPer-style 6 joints + 1 gripper
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(f"""data:
  class_path: datamodules.LeRobotDataModule
  init_args: {{root: {tmp_path / 'ds'}, static_camera: top, wrist_camera: wrist, arm_dim: 6, num_steps: 4,
              batch_size: 2, num_workers: 0, val_fraction: 0.34, stats_cache_dir: {tmp_path / 'stats'}}}
model:
  init_args:
    student: {{init_args: {{gripper_state: width, gripper_state_dim: 1}}}}
    teacher:
      class_path: teachers.TransformerTeacher
      init_args: {{hidden_size: 32, num_layers: 1, max_steps: 8, gripper_state: width, gripper_state_dim: 1}}
""")
    ckpts = {}
    for stage, config in (("align", "tiny_align.yaml"), ("finetune", "tiny_finetune.yaml")):
        root = tmp_path / stage
        extra = [f"--model.init_args.init_from={ckpts['align']}"] if stage == "finetune" else []
        main(["fit", "--config", str(CONFIGS / config), "--config", str(data_yaml),
              f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}", *FAST,
              *extra])
        ckpts[stage] = sorted(root.glob("version_*/checkpoints/last.ckpt"))[-1]
    ckpt = torch.load(ckpts["finetune"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and len(ckpt["normalizer"]["arm_low"]) == 6


def test_convert_calvin_binary_gripper_state(tmp_path, capsys):
    from cli import main
    from datamodules.calvin import CalvinReader
    from tests.datamodules.conftest import write_split

    split = tmp_path / "task_D_D" / "training"
    write_split(split, [(0, 19)], [(0, 9, "open the drawer"), (10, 19, "push the block")])
    out = tmp_path / "calvin_lerobot"
    main(["data", "convert", str(split), "--format", "calvin", "--option", "num_steps=4", "--to", "lerobot",
          "--out", str(out), "--vcodec", "libx264rgb", "--pix-fmt", "rgb24", "--crf", "0"])
    assert "gripper_state: \"binary\"" in capsys.readouterr().out
    src = CalvinReader(split, num_steps=4)
    dst = LeRobotReader(out, static_camera="image", wrist_camera="wrist_image", gripper_state="binary",
                        gripper_range=[-1.0, 1.0])
    assert dst.robot == src.robot
    for e, ep in enumerate(src.episodes):
        a, b = src.read(e, 0, ep.length), dst.read(e, 0, ep.length)
        assert dst.episodes[e].instruction == ep.instruction
        for key in ("state", "action", "static", "wrist"):  # CALVIN's 200 and 84 px views, lossless
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_open_videos_are_bounded_and_reopened(tmp_path):
    src = write(tmp_path / "ds", per_file=1)  # 3 files per camera
    r = reader(tmp_path / "ds")
    r.decoder.max_open = 2
    opened = []
    for e in (0, 1, 2, 0):
        np.testing.assert_array_equal(r.read(e, 1, 3).wrist, src[e]["images"]["wrist"][1:3])
        opened.append(r.decoder.open_files())
    assert opened == [2, 2, 2, 2]  # static + wrist of one episode; older files closed as new ones open
    r.close()
    assert r.decoder.open_files() == 0


def test_convert_one_camera_and_bad_codec(tmp_path):
    from datamodules.aloha import AlohaReader
    from datamodules.lerobot_write import convert
    from tests.conftest import write_dataset

    src = write_dataset(tmp_path / "aloha", lengths=(5, 6), ids=(0, 1), hw=(32, 48))
    aloha = AlohaReader(tmp_path / "aloha", static_camera="cam_high", wrist_camera="cam_high",
                        instruction="x")
    with pytest.raises(DataError, match=r"--vcodec: 'h265x' is not a video encoder"):
        convert(aloha, tmp_path / "bad", 50, ("top", "top"), video=VideoOptions(vcodec="h265x"))
    assert not list(tmp_path.glob("bad*"))  # nothing left behind
    convert(aloha, tmp_path / "sim", 50, ("top", "top"), video=LOSSLESS, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "sim/videos").iterdir()) == ["observation.images.top"]
    r = LeRobotReader(tmp_path / "sim", static_camera="top", wrist_camera="top")  # one camera, both views
    fr = r.read(1, 0, 6)
    np.testing.assert_array_equal(fr.static, src[1]["images"]["cam_high"])
    np.testing.assert_array_equal(fr.wrist, src[1]["images"]["cam_high"])


def test_worker_processes_decode_the_same_windows(tmp_path):
    write(tmp_path / "ds")
    batches = []
    for workers in (0, 2):  # forked workers open their own containers (the parent's already has some)
        dm = LeRobotDataModule(str(tmp_path / "ds"), static_camera="top", wrist_camera="wrist", num_steps=3,
                               image_size=16, batch_size=4, num_workers=workers, val_fraction=0.34,
                               stats_cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        dm._val[0]  # the parent process decodes first
        batches.append(list(dm.val_dataloader()))
    assert len(batches[0]) == len(batches[1]) > 1
    for a, b in zip(*batches):
        assert torch.equal(a.images, b.images) and torch.equal(a.actions, b.actions)


def test_missing_root_names_the_config_key(tmp_path):
    dm = LeRobotDataModule(str(tmp_path / "nowhere"), num_workers=0, stats_cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"nowhere: data.init_args.root: does not exist$"):
        dm.setup("fit")
    with pytest.raises(DataError, match=r"meta/info.json: meta/info.json: missing meta file"):
        LeRobotReader(tmp_path)  # a directory, but not a dataset
