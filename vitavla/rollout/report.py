"""Evaluation reports: results.json, a per-task success bar chart (PIL only), episode videos (PyAV), and
TensorBoard logging.

``write_report`` takes the per-episode outcomes either as :class:`EpisodeResult` objects or as the runner's
results JSON-lines file, so a report can be rebuilt from a finished (or resumed) evaluation without
re-running it. Errors (simulator crashes) are counted apart and never enter a success rate, as in
:func:`vitavla.rollout.runner.summarize`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitavla.rollout.runner import EpisodeResult, load_results

BAR_COLOR = (46, 125, 50)  # a colour used nowhere else in the chart, so tests can count bar pixels
CHART_W, CHART_H, PLOT_H, MARGIN = 640, 320, 240, 40


def _records(episodes) -> list[dict]:
    if isinstance(episodes, (str, Path)):
        return load_results(episodes)
    return [asdict(e) if isinstance(e, EpisodeResult) else dict(e) for e in episodes]


def _final(records: list[dict]) -> list[dict]:
    """One record per (task, episode, seed): its first error-free attempt, else its last error (as the runner)."""
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault((r["task"], r["episode"], r.get("seed", 0)), []).append(r)
    return [next((r for r in rs if r.get("error") is None), rs[-1]) for rs in by_key.values()]


def _per_task(records: list[dict], task_names: dict[int, str] | None) -> dict[int, dict]:
    per_task: dict[int, dict] = {}
    for r in sorted(records, key=lambda r: (r["task"], r["episode"])):
        t = per_task.setdefault(int(r["task"]), {"name": r.get("task_name") or (task_names or {}).get(r["task"])
                                                 or f"task{r['task']}", "successes": 0, "episodes": 0,
                                                 "errors": 0, "steps": 0})
        if r.get("error") is not None:
            t["errors"] += 1
            continue
        t["episodes"] += 1
        t["successes"] += int(bool(r["success"]))
        t["steps"] += int(r.get("steps", 0))
    for t in per_task.values():
        n = t.pop("steps")
        t["success_rate"] = t["successes"] / t["episodes"] if t["episodes"] else None
        t["mean_steps"] = n / t["episodes"] if t["episodes"] else None
    return per_task


def write_report(results: dict, episodes, out_dir: str | Path) -> dict:
    """Write ``results.json`` and ``success_per_task.png`` into ``out_dir``; returns the JSON written.

    ``results``: protocol / config information to store alongside (suite, protocol, checkpoint, ...);
    its ``task_names`` entry ({index: name}) names tasks whose records carry no ``task_name``.
    ``episodes``: list of :class:`EpisodeResult` (or dicts) or the path of the runner's results JSONL.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = _final(_records(episodes))
    names = {int(k): v for k, v in (results.get("task_names") or {}).items()}
    per_task = _per_task(records, names)
    total = {k: sum(t[k] for t in per_task.values()) for k in ("successes", "episodes", "errors")}
    sim = sum(float(r.get("seconds_sim", 0.0)) for r in records)
    policy = sum(float(r.get("seconds_policy", 0.0)) for r in records)
    report = {"config": {k: v for k, v in results.items() if k != "task_names"},
              "success_rate": total["successes"] / total["episodes"] if total["episodes"] else None, **total,
              "seconds_sim": sim, "seconds_policy": policy,
              "per_task": {str(k): v for k, v in sorted(per_task.items())}}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    success_chart(per_task).save(out / "success_per_task.png")
    return report


def success_chart(per_task: dict) -> Image.Image:
    """Bar chart of per-task success rates: bar height = rate x ``PLOT_H`` px; tasks with only errors (no
    rate) get no bar and an "n/a" label rather than a misleading 0."""
    img = Image.new("RGB", (CHART_W, CHART_H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    base, top = MARGIN + PLOT_H, MARGIN
    draw.line([(MARGIN, top), (MARGIN, base), (CHART_W - 10, base)], fill=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        y = base - round(frac * PLOT_H)
        draw.text((4, y - 6), f"{frac:.1f}", fill=(0, 0, 0))
    tasks = sorted(per_task.items(), key=lambda kv: int(kv[0]))
    slot = (CHART_W - MARGIN - 20) / max(len(tasks), 1)
    for i, (t, v) in enumerate(tasks):
        x0 = MARGIN + 6 + round(i * slot)
        x1 = MARGIN + round((i + 1) * slot) - 6
        rate = v.get("success_rate")
        if rate is not None and rate > 0:
            draw.rectangle([x0, base - round(rate * PLOT_H), x1, base - 1], fill=BAR_COLOR)
        label = "n/a" if rate is None else f"{rate:.2f}"
        draw.text((x0, base + 4), f"{int(t)}", fill=(0, 0, 0))
        draw.text((x0, base + 18), label, fill=(0, 0, 0))
    return img


def write_video(frames: list, path: str | Path, fps: int = 20) -> Path:
    """Encode H x W x 3 uint8 frames as H.264 mp4 (yuv420p). Odd sizes are padded by one edge pixel,
    since yuv420p needs even dimensions."""
    try:
        import av
    except ImportError as e:
        raise ImportError("write_video needs PyAV: pip install av (or the 'sim' extra)") from e
    if not frames:
        raise ValueError("write_video got no frames")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"frames must be H x W x 3, got {first.shape}")
    h, w = first.shape[0] + first.shape[0] % 2, first.shape[1] + first.shape[1] % 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            f = np.asarray(f, dtype=np.uint8)
            if f.shape[:2] != first.shape[:2]:
                raise ValueError(f"all frames must be {first.shape[:2]}, got {f.shape[:2]}")
            f = np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's buffered frames
            container.mux(packet)
    return path


def save_videos(episodes: list[EpisodeResult], out_dir: str | Path, per_task: int = 2, fps: int = 20) -> list[Path]:
    """Write up to ``per_task`` videos per task from episodes recorded with ``record_frames=True``, as
    ``task{t:02d}_ep{e:03d}_{success|failure}.mp4``. A task with both outcomes keeps one of each first, so
    a report shows what success and failure look like; errored or frame-less episodes are skipped."""
    out = Path(out_dir)
    chosen: dict[int, list[EpisodeResult]] = {}
    for e in sorted(episodes, key=lambda e: (e.task, e.episode)):
        if e.frames and e.error is None:
            chosen.setdefault(e.task, []).append(e)
    written = []
    for task, eps in sorted(chosen.items()):
        wins = [e for e in eps if e.success]
        losses = [e for e in eps if not e.success]
        picked = [*wins[:1], *losses[:1]]
        picked += [e for e in eps if e not in picked]
        for e in sorted(picked[:per_task], key=lambda e: e.episode):
            name = f"task{task:02d}_ep{e.episode:03d}_{'success' if e.success else 'failure'}.mp4"
            written.append(write_video(e.frames, out / name, fps))
    return written


def log_to_tensorboard(logger, results: dict, step: int = 0, prefix: str = "rollout") -> None:
    """Log overall and per-task success rates (and the bar chart) to a Lightning TensorBoard logger.

    ``results``: the dict :func:`write_report` returns (or the runner's ``summarize`` output). Tasks with no
    rate are skipped: a missing point is more honest than a logged 0.
    """
    writer = logger.experiment
    if results.get("success_rate") is not None:
        writer.add_scalar(f"{prefix}/success_rate", results["success_rate"], step)
    per_task = results.get("per_task", {})
    for t, v in per_task.items():
        if v.get("success_rate") is not None:
            writer.add_scalar(f"{prefix}/success/task{int(t):02d}", v["success_rate"], step)
    chart = np.asarray(success_chart(per_task))
    writer.add_image(f"{prefix}/success_per_task", chart, step, dataformats="HWC")
    writer.flush()
