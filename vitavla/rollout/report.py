"""Evaluation reports: results.json, a per-task success bar chart (PIL only), episode videos (PyAV), a
first/last-frame sheet of every episode, and TensorBoard logging.

``write_report`` takes the per-episode outcomes either as :class:`EpisodeResult` objects or as the runner's
results JSON-lines file, so a report can be rebuilt from a finished (or resumed) evaluation without
re-running it. Errors (simulator crashes) are counted apart and never enter a success rate, as in
:func:`vitavla.rollout.runner.summarize`. Rates come with their 95% Wilson interval (``success_ci95``).

Videos are for people: at least ``VIDEO_MIN_SIZE`` px (a smaller frame is enlarged by an integer factor,
nearest neighbour, so no pixel is invented), with the instruction and the outcome (SUCCESS / FAILURE, steps)
written in a banner above the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vitavla.images import upscale_nearest
from vitavla.rollout.episode import EpisodeResult
from vitavla.rollout.records import final_record, load_results, record_key, result_record
from vitavla.rollout.stats import success_ci95

BAR_COLOR = (46, 125, 50)  # a colour used nowhere else in the chart, so tests can count bar pixels
CHART_W, CHART_H, PLOT_H, MARGIN = 640, 320, 240, 40
VIDEO_MIN_SIZE = 256  # px, the shorter side of a video frame (without its banner)
# Outcome colours of video banners and sheet labels; used nowhere else, so tests can find them.
SUCCESS_COLOR, FAILURE_COLOR, ERROR_COLOR = (27, 120, 55), (178, 24, 43), (150, 110, 20)
TEXT_BG = (24, 24, 24)
LABEL_H = 18  # px, the one-line outcome label above each episode of the first/last sheet


def _records(episodes) -> list[dict]:
    if isinstance(episodes, (str, Path)):
        return load_results(episodes)
    return [result_record(e) if isinstance(e, EpisodeResult) else dict(e) for e in episodes]


def _finals(records: list[dict]) -> list[dict]:
    """One record per (task, episode, seed): its first error-free attempt, else its last error (as the runner)."""
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault(record_key({**r, "seed": r.get("seed", 0)}), []).append(r)
    return [final_record(rs) for rs in by_key.values()]


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
        t["success_ci95"] = success_ci95(t["successes"], t["episodes"])
        t["mean_steps"] = n / t["episodes"] if t["episodes"] else None
    return per_task


def write_report(results: dict, episodes, out_dir: str | Path) -> dict:
    """Write ``results.json``, ``success_per_task.png`` and ``first_last.png`` into ``out_dir``; returns the
    JSON written.

    ``results``: protocol / config information to store alongside (suite, protocol, checkpoint, ...);
    its ``task_names`` entry ({index: name}) names tasks whose records carry no ``task_name``.
    ``episodes``: list of :class:`EpisodeResult` (or dicts) or the path of the runner's results JSONL.
    ``first_last.png`` shows the first and last frame of every episode whose pair is in
    ``out_dir/first_last/`` (:func:`save_first_last`; EpisodeResults given here are saved there first).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(episodes, (str, Path)):
        episodes = list(episodes)
        for e in episodes:
            if isinstance(e, EpisodeResult):
                save_first_last(e, out / "first_last")
    records = _finals(_records(episodes))
    names = {int(k): v for k, v in (results.get("task_names") or {}).items()}
    per_task = _per_task(records, names)
    total = {k: sum(t[k] for t in per_task.values()) for k in ("successes", "episodes", "errors")}
    sim = sum(float(r.get("seconds_sim", 0.0)) for r in records)
    policy = sum(float(r.get("seconds_policy", 0.0)) for r in records)
    report = {"config": {k: v for k, v in results.items() if k != "task_names"},
              "success_rate": total["successes"] / total["episodes"] if total["episodes"] else None,
              "success_ci95": success_ci95(total["successes"], total["episodes"]), **total,
              "seconds_sim": sim, "seconds_policy": policy,
              "per_task": {str(k): v for k, v in sorted(per_task.items())}}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    success_chart(per_task).save(out / "success_per_task.png")
    sheet = first_last_sheet(records, out / "first_last", {t: v["name"] for t, v in per_task.items()})
    if sheet is not None:
        sheet.save(out / "first_last.png")
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


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # scalable (FreeType), readable at video sizes
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px (a word longer than a line is cut by characters)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if font.getlength(trial) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # one word wider than the frame
                cut = max(1, int(len(line) * width / font.getlength(line)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def text_strip(lines: list[str], width: int, background: tuple[int, int, int], size: int = 12,
               color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """(h, width, 3) uint8: ``lines`` (each wrapped to the width) on ``background``, 2 px padding."""
    font = _font(size)
    wrapped = [w for line in lines for w in _wrap(line, font, width - 8)]
    line_h = size + 3
    img = Image.new("RGB", (width, line_h * len(wrapped) + 4), background)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(wrapped):
        draw.text((4, 2 + i * line_h), line, fill=color, font=font)
    return np.asarray(img)


def outcome_text(success: bool, steps: int, error: str | None = None) -> str:
    """``SUCCESS in 37 steps`` / ``FAILURE after 140 steps`` / ``ERROR after 3 steps`` (simulator crash)."""
    if error is not None:
        return f"ERROR after {steps} steps"
    return f"SUCCESS in {steps} steps" if success else f"FAILURE after {steps} steps"


def _outcome_color(success: bool, error: str | None = None) -> tuple[int, int, int]:
    return ERROR_COLOR if error is not None else SUCCESS_COLOR if success else FAILURE_COLOR


def annotate_frames(frames: list, instruction: str, success: bool, steps: int, title: str = "",
                    min_size: int = VIDEO_MIN_SIZE) -> list[np.ndarray]:
    """Video frames for people: each frame enlarged to ``min_size`` px (nearest neighbour, integer factor)
    under a banner with the instruction and, on the outcome's colour, ``SUCCESS in 37 steps`` (or
    FAILURE), ``title`` and the frame's step ``t`` (frame ``t`` is the observation before action ``t``; the
    last one, ``t = steps``, shows the outcome). The outcome is known only at the end, so this runs when the
    video is encoded."""
    if not frames:
        raise ValueError("annotate_frames got no frames")
    first = upscale_nearest(np.asarray(frames[0]), min_size)
    width = first.shape[1]
    header = text_strip([instruction or "(no instruction)"], width, TEXT_BG)
    color = _outcome_color(success)
    head = " | ".join([outcome_text(success, steps), *([title] if title else [])])
    out = []
    for t, frame in enumerate(frames):
        img = first if t == 0 else upscale_nearest(np.asarray(frame), min_size)
        # The step counter has a line of its own: appended to ``head`` it can push the line past the width
        # as t grows (t=9 -> t=100), and a strip one line taller would change the frame size mid-video.
        status = text_strip([head, f"t={t}"], width, color)
        out.append(np.concatenate([header, status, img], axis=0))
    return out


def save_videos(episodes: list[EpisodeResult], out_dir: str | Path, per_task: int = 2, fps: int = 20,
                task_names: list[str] | dict[int, str] | None = None,
                min_size: int = VIDEO_MIN_SIZE) -> list[Path]:
    """Write up to ``per_task`` videos per task from episodes recorded with ``record_frames=True``, as
    ``task{t:02d}_ep{e:03d}_{success|failure}.mp4``, annotated by :func:`annotate_frames` (instruction,
    outcome, task and episode; frames enlarged to ``min_size`` px). A task with both outcomes keeps one of
    each first, so a report shows what success and failure look like; errored or frame-less episodes are
    skipped."""
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
            label = _task_label(task, task_names)
            frames = annotate_frames(e.frames, e.instruction or label, e.success, e.steps,
                                     title=f"task {task} ep {e.episode}", min_size=min_size)
            written.append(write_video(frames, out / name, fps))
    return written


def _task_label(task: int, task_names) -> str:
    if task_names is None:
        return f"task {task}"
    try:
        return str(task_names[task])
    except (KeyError, IndexError):
        return f"task {task}"


# -- first and last frame of every episode ---------------------------------------------------------------
def _pair_path(out_dir: Path, task: int, episode: int) -> Path:
    return out_dir / f"task{task:02d}_ep{episode:03d}.png"


def save_first_last(res: EpisodeResult, out_dir: str | Path) -> Path | None:
    """Save an episode's first and last frame side by side as ``task{t:02d}_ep{e:03d}.png`` (a later attempt
    of the same episode replaces it); None when the episode has no frames (it crashed in reset)."""
    if not res.first_last:
        return None
    first, last = (np.ascontiguousarray(f, dtype=np.uint8) for f in res.first_last)
    if last.shape != first.shape:  # frames of one episode normally share a size; keep the pair readable
        last = np.asarray(Image.fromarray(last).resize((first.shape[1], first.shape[0]), Image.NEAREST))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = _pair_path(out, res.task, res.episode)
    Image.fromarray(np.concatenate([first, last], axis=1)).save(path)
    return path


def _fit_height(img: Image.Image, height: int) -> Image.Image:
    width = max(1, round(img.width * height / img.height))
    # Enlarging: exact pixels (nearest); shrinking: box filter, which averages instead of dropping pixels.
    return img.resize((width, height), Image.NEAREST if height >= img.height else Image.BOX)


def first_last_sheet(records: list[dict], pair_dir: str | Path, task_names: dict[int, str] | None = None,
                     thumb: int = 128, columns: int = 8) -> Image.Image | None:
    """One image of every episode with a saved pair (:func:`save_first_last`): a row block per task, titled
    with its name, of cells [first | last] scaled to ``thumb`` px high, each labelled ``ep 3  SUCCESS in 37
    steps`` on the outcome's colour (green / red; amber for a simulator error). ``records``: final records
    (task, episode, success, steps, error; optionally ``outcome``, the label's text). None when no episode
    has a pair."""
    pair_dir = Path(pair_dir)
    by_task: dict[int, list[tuple[dict, Image.Image]]] = {}
    for r in sorted(records, key=lambda r: (int(r["task"]), int(r["episode"]))):
        path = _pair_path(pair_dir, int(r["task"]), int(r["episode"]))
        if path.is_file():
            with Image.open(path) as im:
                by_task.setdefault(int(r["task"]), []).append((r, _fit_height(im.convert("RGB"), thumb)))
    if not by_task:
        return None
    cell_w = max(im.width for cells in by_task.values() for _, im in cells)
    gap = 6
    width = columns * (cell_w + gap) + gap
    blocks = []
    for task, cells in sorted(by_task.items()):
        name = (task_names or {}).get(task) or cells[0][0].get("task_name") or f"task{task}"
        rows = [text_strip([f"task {task}: {name}   (first | last frame)"], width, TEXT_BG)]
        for start in range(0, len(cells), columns):
            row = Image.new("RGB", (width, thumb + LABEL_H + gap), (255, 255, 255))
            for i, (r, im) in enumerate(cells[start:start + columns]):
                x = gap + i * (cell_w + gap)
                ok, error = bool(r.get("success")), r.get("error")
                # A record may bring its own outcome text (a CALVIN chain: "3/5 subtasks").
                text = f"ep {r['episode']}  {r.get('outcome') or outcome_text(ok, int(r.get('steps', 0)), error)}"
                # One line: a label too long for a narrow cell is cut rather than pushing the frames down.
                label = text_strip([text], cell_w, _outcome_color(ok, error), size=11)[:LABEL_H]
                row.paste(Image.fromarray(np.ascontiguousarray(label)), (x, 0))
                row.paste(im, (x, LABEL_H))
            rows.append(np.asarray(row))
        blocks.append(np.concatenate(rows, axis=0))
    return Image.fromarray(np.concatenate(blocks, axis=0))


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


# -- CALVIN chains --------------------------------------------------------------------------------------
def chain_outcome(completed: int, error: str | None = None, subtasks: int = 5) -> str:
    """``3/5 subtasks`` (``ERROR`` for a simulator crash): a chain's label on the contact sheet."""
    return "ERROR" if error is not None else f"{completed}/{subtasks} subtasks"


def chain_chart(chain_sr: dict | None, avg_seq_len: float | None = None, chains: int = 0) -> Image.Image:
    """CALVIN's figure: the fraction of chains with at least k subtasks done in a row, k = 1..5 (bars labelled
    1..5), captioned with Avg. Len. and the number of chains; no bars ("n/a") when no chain was evaluated."""
    per_k = {int(k): {"success_rate": sr} for k, sr in (chain_sr or {}).items()}
    img = success_chart(per_k or {k: {"success_rate": None} for k in range(1, 6)})
    shown = "n/a" if avg_seq_len is None else f"{avg_seq_len:.2f}"
    ImageDraw.Draw(img).text((MARGIN + 8, 8), f"chains with >= k subtasks done in a row (k = 1..5); Avg. Len. "
                             f"{shown} over {chains} chains", fill=(0, 0, 0), font=_font(12))
    return img


def chain_video_frames(frames: list, instructions: list[str], steps: list[int], completed: int, title: str,
                       min_size: int = VIDEO_MIN_SIZE) -> list[np.ndarray]:
    """One video of a whole chain: the frames of each attempted subtask (``steps[j] + 1`` of them, sharing
    the boundary frame with the next subtask) annotated with ``(j/5) instruction`` and that subtask's outcome
    (:func:`annotate_frames`); banners are padded to one height so the video keeps one frame size."""
    if len(frames) != sum(steps) + 1 or len(instructions) < len(steps):
        raise ValueError(f"a chain video needs sum(steps) + 1 = {sum(steps) + 1} frames and one instruction per "
                         f"subtask, got {len(frames)} frames, {len(instructions)} instructions, steps {steps}")
    segments, start = [], 0
    for j, n in enumerate(steps):
        seg = annotate_frames(frames[start:start + n + 1], f"({j + 1}/{len(steps)}) {instructions[j]}",
                              j < completed, n, title=title, min_size=min_size)
        segments.append(seg if j == 0 else seg[1:])  # the boundary frame is the previous segment's last
        start += n
    height = max(seg[0].shape[0] for seg in segments if seg)
    out = []
    for seg in segments:
        for f in seg:
            pad = np.empty((height - f.shape[0], f.shape[1], 3), dtype=np.uint8)
            pad[:] = TEXT_BG
            out.append(np.concatenate([pad, f], axis=0))
    return out
