"""Reports without a simulator: results.json (with Wilson intervals), the PIL bar chart, annotated mp4s,
the first/last-frame sheet, TensorBoard logging."""

import json

import numpy as np
import pytest
from PIL import Image

from vitavla.rollout.report import (BAR_COLOR, ERROR_COLOR, FAILURE_COLOR, LABEL_H, PLOT_H, SUCCESS_COLOR,
                                    TEXT_BG, annotate_frames, chain_chart, chain_video_frames, first_last_sheet, log_to_tensorboard, save_first_last,
                                    save_videos, write_report, write_video)
from vitavla.rollout.runner import EpisodeResult
from vitavla.rollout.stats import wilson_interval


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
    ci = data["per_task"]["0"].pop("success_ci95")
    assert data["per_task"]["0"] == {"name": "a", "successes": 2, "episodes": 2, "errors": 0,
                                     "success_rate": 1.0, "mean_steps": 6.0}
    assert ci == [pytest.approx(0.3424, abs=1e-4), 1.0]  # 2/2: Wilson 95%
    assert data["success_ci95"] == pytest.approx([0.3006, 0.9544], abs=1e-4)  # 3/4
    assert data["per_task"]["1"]["success_rate"] == 0.5
    assert data["per_task"]["1"]["success_ci95"] == pytest.approx([0.0945, 0.9055], abs=1e-4)  # 1/2
    assert data["per_task"]["2"]["success_rate"] is None and data["per_task"]["2"]["errors"] == 1
    assert data["per_task"]["2"]["success_ci95"] is None  # no error-free episode: no interval either
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


@pytest.mark.parametrize("successes, n, lo, hi", [
    (3, 10, 0.1078, 0.6032), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),
    (1, 1, 0.2065, 1.0), (45, 50, 0.7864, 0.9565)])
def test_wilson_interval_known_values(successes, n, lo, hi):
    got = wilson_interval(successes, n)
    assert got == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))
    if successes == 0:
        assert got[0] == 0.0  # exactly, not -1e-17
    if successes == n:
        assert got[1] == 1.0


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) is None
    lo90, hi90 = wilson_interval(3, 10, z=1.645)
    lo95, hi95 = wilson_interval(3, 10)
    assert lo95 < lo90 < 0.3 < hi90 < hi95  # a lower confidence level gives a narrower interval around p
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="z must be positive"):
        wilson_interval(1, 10, z=0)


def _band_rows(img: np.ndarray, color) -> int:
    """Rows of ``img`` whose first column (left padding, never text) has exactly ``color``."""
    return int(np.all(img[:, 0] == color, axis=-1).sum())


def test_annotated_frames_are_enlarged_under_an_outcome_banner():
    frames = [np.full((64, 64, 3), 10 * i, dtype=np.uint8) for i in range(4)]
    frames[2][5, 7] = (255, 0, 0)
    out = annotate_frames(frames, "pick up the alphabet soup and place it in the basket", True, 3,
                          title="task 0 ep 1")
    assert len(out) == 4
    banner = out[0].shape[0] - 256
    assert all(f.shape == (banner + 256, 256, 3) and f.dtype == np.uint8 for f in out)
    # The picture below the banner is the frame enlarged 4x, nearest neighbour: exact pixels.
    np.testing.assert_array_equal(out[2][banner:], np.repeat(np.repeat(frames[2], 4, 0), 4, 1))
    assert (out[2][banner + 20:banner + 24, 28:32] == (255, 0, 0)).all()
    header = _band_rows(out[0], TEXT_BG)
    status = _band_rows(out[0], SUCCESS_COLOR)
    assert header + status == banner and header >= 2 * 15  # the long instruction wraps to two lines
    # Text is drawn: the banner holds bright glyph pixels, and the step counter differs between frames.
    assert (out[0][:banner].max(axis=-1) > 200).sum() > 100
    assert not np.array_equal(out[0][header:banner], out[1][header:banner])
    assert np.array_equal(out[0][:header], out[3][:header])  # the instruction is the same on every frame
    failed = annotate_frames(frames, "open the drawer", False, 3)
    assert _band_rows(failed[0], FAILURE_COLOR) > 0 and _band_rows(failed[0], SUCCESS_COLOR) == 0
    # A long episode at the quickstart's 64 px: the banner keeps one height from t=0 to t=160 (a video
    # needs one frame size), with the long title that used to wrap once t reached three digits.
    long = annotate_frames([np.zeros((64, 64, 3), np.uint8)] * 161, "pick up the alphabet soup and place "
                           "it in the basket", False, 160, title="task 0 ep 40")
    assert len({f.shape for f in long}) == 1
    large = annotate_frames([np.zeros((300, 400, 3), np.uint8)], "x", False, 0)[0]
    assert large.shape[1] == 400  # already large enough: not enlarged


def test_saved_videos_are_at_least_256_px_with_the_banner(tmp_path):
    av = pytest.importorskip("av")
    frames = [np.full((32, 32, 3), 200, dtype=np.uint8) for _ in range(3)]
    res = EpisodeResult(1, 4, False, 2, frames=frames, instruction="put the bowl on the plate")
    (path,) = save_videos([res], tmp_path, per_task=1, task_names=["a", "b"])
    assert path.name == "task01_ep004_failure.mp4"
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    want = annotate_frames(frames, "put the bowl on the plate", False, 2, title="task 1 ep 4")
    assert len(decoded) == 3 and decoded[0].shape[1] == 256 and decoded[0].shape[0] >= 256 + 30
    assert abs(decoded[1][-100:, 100:150].astype(int) - 200).max() <= 4  # the enlarged picture
    status_rows = np.flatnonzero(np.all(want[0][:, 0] == FAILURE_COLOR, axis=-1))
    red = decoded[0][status_rows[len(status_rows) // 2], :3].astype(int)
    assert np.abs(red - FAILURE_COLOR).max() <= 12  # the red outcome strip survives the encoder


def _runs(index: np.ndarray) -> list[np.ndarray]:
    return np.split(index, np.flatnonzero(np.diff(index) > 1) + 1) if index.size else []


def _patches(img: np.ndarray, color) -> int:
    """Separate rectangles of ``color``: column runs within each run of rows that contain it."""
    mask = np.all(img == color, axis=-1)
    row_runs = _runs(np.flatnonzero(mask.any(axis=1)))
    return sum(len(_runs(np.flatnonzero(mask[rows].any(axis=0)))) for rows in row_runs)


def test_first_last_sheet_labels_every_episode(tmp_path):
    colors = {(0, 0): (250, 0, 0), (0, 1): (0, 0, 250), (1, 0): (250, 250, 0)}
    eps = [EpisodeResult(t, e, (t, e) == (0, 0), 5 + e, first_last=[np.full((16, 16, 3), 7, np.uint8),
                                                                   np.full((16, 16, 3), c, np.uint8)])
           for (t, e), c in colors.items()]
    eps.append(EpisodeResult(1, 1, False, 0, error="RuntimeError: boom"))  # crashed in reset: no frames
    eps.append(EpisodeResult(2, 0, False, 3, error="RuntimeError: boom",
                             first_last=[np.full((16, 16, 3), 7, np.uint8)] * 2))
    assert save_first_last(eps[3], tmp_path / "pairs") is None
    pair = save_first_last(eps[0], tmp_path / "pairs")
    assert pair.name == "task00_ep000.png" and Image.open(pair).size == (32, 16)

    write_report({"task_names": {0: "soup", 1: "bowl", 2: "mug"}}, eps, tmp_path)
    sheet = np.asarray(Image.open(tmp_path / "first_last.png").convert("RGB"))
    thumb = 128
    for c in colors.values():  # each last frame: one thumb x thumb block of its colour (16 px enlarged 8x)
        assert np.all(sheet == c, axis=-1).sum() == thumb * thumb
    assert np.all(sheet == (7, 7, 7), axis=-1).sum() == 5 * thumb * thumb  # 3 first frames + the crash's 2
    # One label per episode with a pair, on its outcome colour: 1 success, 2 failures, 1 simulator error.
    assert [_patches(sheet, c) for c in (SUCCESS_COLOR, FAILURE_COLOR, ERROR_COLOR)] == [1, 2, 1]
    assert all(np.all(sheet == c, axis=-1).any(axis=1).sum() <= LABEL_H * 2
               for c in (SUCCESS_COLOR, FAILURE_COLOR, ERROR_COLOR))  # one-line labels
    # Three task blocks, each titled on the dark title strip.
    assert len(_runs(np.flatnonzero(np.all(sheet[:, 0] == TEXT_BG, axis=-1)))) == 3
    assert first_last_sheet([], tmp_path / "pairs") is None


def test_chain_chart_has_one_bar_per_k_and_a_chain_video_shows_each_subtask(tmp_path):
    chain_chart({1: 0.75, 2: 0.5, 3: 0.25, 4: 0.25, 5: 0.0}, 1.75, 4).save(tmp_path / "sr.png")
    assert _bar_heights(tmp_path / "sr.png") == [round(r * PLOT_H) for r in (0.75, 0.5, 0.25, 0.25)]
    chain_chart(None).save(tmp_path / "none.png")
    assert _bar_heights(tmp_path / "none.png") == []
    # A chain: subtask 1 done in 2 steps, subtask 2 failed after 3; 1 + 2 + 3 frames.
    frames = [np.full((64, 64, 3), 40 * i, dtype=np.uint8) for i in range(6)]
    out = chain_video_frames(frames, ["open the drawer", "push the red block all the way to the left " * 3],
                             [2, 3], 1, title="chain 7")
    assert len(out) == 6 and len({f.shape for f in out}) == 1  # one frame size across subtasks
    banner = out[0].shape[0] - 256
    for f, src in zip(out, frames):  # every frame once, in order, under its banner
        np.testing.assert_array_equal(f[banner:], np.repeat(np.repeat(src, 4, 0), 4, 1))
    assert _band_rows(out[2], SUCCESS_COLOR) > 0 and _band_rows(out[3], FAILURE_COLOR) > 0
    with pytest.raises(ValueError, match="sum\\(steps\\) \\+ 1 = 6 frames"):
        chain_video_frames(frames[:5], ["a", "b"], [2, 3], 1, title="")
