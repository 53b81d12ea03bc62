"""Reports without a simulator: results.json, the PIL bar chart, mp4 round trip, TensorBoard logging."""

import json

import numpy as np
import pytest
from PIL import Image

from vitavla.rollout.report import BAR_COLOR, PLOT_H, log_to_tensorboard, save_videos, write_report, write_video
from vitavla.rollout.runner import EpisodeResult


def _episodes(frames: bool = False):
    f = [np.full((31, 45, 3), 10 * i, dtype=np.uint8) for i in range(5)] if frames else None
    return [EpisodeResult(0, 0, True, 5, frames=f), EpisodeResult(0, 1, True, 7, frames=f),
            EpisodeResult(1, 0, True, 4, frames=f), EpisodeResult(1, 1, False, 9, frames=f),
            EpisodeResult(2, 0, False, 3, error="RuntimeError: boom")]


def _bar_heights(png) -> list[int]:
    """Height in px of each green bar, scanning columns left to right."""
    mask = np.all(np.asarray(Image.open(png).convert("RGB")) == BAR_COLOR, axis=-1)
    cols = mask.sum(axis=0)
    heights, prev = [], 0
    for c in cols:
        if c and not prev:
            heights.append(int(c))
        prev = c
    return heights


def test_results_json_and_chart(tmp_path):
    report = write_report({"suite": "libero_10", "protocol": "seer", "task_names": {0: "a", 1: "b", 2: "c"}},
                          _episodes(), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["config"] == {"suite": "libero_10", "protocol": "seer"}
    assert (data["successes"], data["episodes"], data["errors"]) == (3, 4, 1)
    assert data["success_rate"] == 0.75
    assert data["per_task"]["0"] == {"name": "a", "successes": 2, "episodes": 2, "errors": 0,
                                     "success_rate": 1.0, "mean_steps": 6.0}
    assert data["per_task"]["1"]["success_rate"] == 0.5
    assert data["per_task"]["2"]["success_rate"] is None and data["per_task"]["2"]["errors"] == 1
    # Full-height bar for 100 %, half for 50 %, none for the task with only errors.
    assert _bar_heights(tmp_path / "success_per_task.png") == [PLOT_H, PLOT_H // 2]


def test_report_from_jsonl_keeps_first_success(tmp_path):
    path = tmp_path / "results.jsonl"
    recs = [{"task": 0, "episode": 0, "seed": 0, "success": False, "steps": 2, "error": "crash",
             "task_name": "reach"},
            {"task": 0, "episode": 0, "seed": 0, "success": True, "steps": 4, "error": None, "task_name": "reach"},
            {"task": 0, "episode": 1, "seed": 0, "success": False, "steps": 8, "error": None, "task_name": "reach"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = write_report({}, path, tmp_path / "out")
    assert data["per_task"]["0"]["name"] == "reach"
    assert (data["successes"], data["episodes"], data["errors"]) == (1, 2, 0)


def test_video_round_trip(tmp_path):
    av = pytest.importorskip("av")
    frames = [np.full((31, 45, 3), 20 * i, dtype=np.uint8) for i in range(6)]  # odd dims get padded
    path = write_video(frames, tmp_path / "v.mp4", fps=10)
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 6
    assert decoded[0].shape == (32, 46, 3)
    assert abs(int(decoded[3][10, 10, 0]) - 60) <= 4  # lossy, but the content survives


def test_save_videos_names_and_per_task(tmp_path):
    pytest.importorskip("av")
    paths = save_videos(_episodes(frames=True), tmp_path, per_task=1)
    assert sorted(p.name for p in paths) == ["task00_ep000_success.mp4", "task01_ep000_success.mp4"]
    paths = save_videos(_episodes(frames=True), tmp_path / "two", per_task=2)
    assert "task01_ep001_failure.mp4" in {p.name for p in paths} and len(paths) == 4


def test_write_video_rejects_empty(tmp_path):
    pytest.importorskip("av")
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "x.mp4")


def test_log_to_tensorboard(tmp_path):
    class Writer:
        def __init__(self):
            self.scalars, self.images = {}, {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def add_image(self, tag, img, step, dataformats):
            self.images[tag] = (img.shape, dataformats)

        def flush(self):
            pass

    class Logger:
        experiment = Writer()

    report = write_report({}, _episodes(), tmp_path)
    log_to_tensorboard(Logger, report, step=3)
    w = Logger.experiment
    assert w.scalars["rollout/success_rate"] == (0.75, 3)
    assert w.scalars["rollout/success/task01"] == (0.5, 3)
    assert "rollout/success/task02" not in w.scalars  # only errors: no made-up 0
    assert w.images["rollout/success_per_task"][1] == "HWC"
