"""`vitavla data check --format lerobot` on broken copies of a LeRobotDataset v3: each fails with one line
naming the file and key, and leaves the files as they were."""

from __future__ import annotations

import shutil

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from datamodules.base import DataError  # noqa: E402
from datamodules.lerobot import LeRobotReader  # noqa: E402
from tests.datamodules.lerobot_data import FPS, write  # noqa: E402


def _rewrite_parquet(path, column, fn):
    table = pq.read_table(path)
    values = fn(table.column(column).to_pylist())
    i = table.column_names.index(column)
    pq.write_table(table.set_column(i, column, pa.array(values, table.schema.field(column).type)), path)


def _reencode(path, keep: int | None = None, fps: int = FPS):
    with av.open(str(path)) as c:
        imgs = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    imgs = imgs[:keep] if keep is not None else imgs
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264rgb", rate=fps, options={"crf": "0", "g": "2"})
        s.width, s.height, s.pix_fmt = imgs[0].shape[1], imgs[0].shape[0], "rgb24"
        for i, img in enumerate(imgs):
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            fr.pts = i
            c.mux(s.encode(fr))
        c.mux(s.encode())


def _nan(values):
    values[3][2] = float("nan")
    return values


def _swap(values):
    values[2], values[3] = values[3], values[2]
    return values


DATA0 = "data/chunk-000/file-000.parquet"
TOP0 = "videos/observation.images.top/chunk-000/file-000.mp4"
BREAKS = {
    "missing meta file": (lambda r: (r / "meta/tasks.parquet").unlink(),
                          "meta/tasks.parquet: meta/tasks.parquet: missing meta file"),
    "feature absent from parquet": (
        lambda r: pq.write_table(pq.read_table(r / DATA0).drop_columns(["task_index"]), r / DATA0),
        f"{DATA0}: task_index: feature named in meta/info.json is not a column of this file"),
    "video shorter than episode": (lambda r: _reencode(r / TOP0, keep=12),
                                   f"{TOP0}: observation.images.top: video shorter than its episode: "
                                   f"episode 1"),
    "timestamps out of order": (lambda r: _rewrite_parquet(r / DATA0, "timestamp", _swap),
                                f"{DATA0}: timestamp: episode 0: timestamps out of order at frame 3"),
    "fps mismatch (info.json)": (
        lambda r: (r / "meta/info.json").write_text(
            (r / "meta/info.json").read_text().replace('"fps": 10', '"fps": 15')),
        f"{DATA0}: timestamp: episode 0: frame 1 at 0.100000 s but frame_index / fps = 0.066667 s (fps 15"),
    "fps mismatch (video)": (lambda r: _reencode(r / TOP0, fps=20),
                             f"{TOP0}: observation.images.top: fps mismatch: the video plays at 20 fps"),
    "NaN": (lambda r: _rewrite_parquet(r / DATA0, "action", _nan),
            f"{DATA0}: action: NaN/inf at episode 0 frame 3 column 2"),
    "corrupt mp4": (lambda r: (r / TOP0).write_bytes((r / TOP0).read_bytes()[: (r / TOP0).stat().st_size // 2]
                                                     ),
                    f"{TOP0}: observation.images.top: cannot"),
    "corrupt mp4 (frame data)": (lambda r: _zero_bytes(r / TOP0, (0.3, 0.5, 0.7)),
                                 f"{TOP0}: observation.images.top: cannot decode frames at"),
    "episode indices disagree": (
        lambda r: _rewrite_parquet(r / DATA0, "episode_index", lambda v: [5 if x == 1 else x for x in v]),
        f"{DATA0}: episode_index: rows with index 7..16 belong to episodes [5]"),
}


def _zero_bytes(path, fractions):
    """Damage the compressed frames (the header stays readable, so this shows only when decoding)."""
    data = bytearray(path.read_bytes())
    for f in fractions:
        i = int(len(data) * f)
        data[i:i + 200] = bytes(200)
    path.write_bytes(bytes(data))


def _snapshot(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "clean"
    write(root)
    return root


def test_check_clean_dataset(clean_dataset, capsys):
    from cli import main

    before = _snapshot(clean_dataset)
    main(["data", "check", str(clean_dataset), "--format", "lerobot", "--option", "static_camera=top",
          "--option", "wrist_camera=wrist"])
    out = capsys.readouterr().out
    assert "OK" in out and "episodes:      3" in out and "frames:        24" in out
    assert "'pick up the cup' x2" in out and "static 32x48" in out
    assert _snapshot(clean_dataset) == before


@pytest.mark.parametrize("case", list(BREAKS))
def test_check_names_file_and_key(clean_dataset, tmp_path, case):
    from cli import main

    root = tmp_path / "ds"
    shutil.copytree(clean_dataset, root)
    breaker, message = BREAKS[case]
    breaker(root)
    before = _snapshot(root)
    with pytest.raises(SystemExit) as e:
        main(["data", "check", str(root), "--format", "lerobot", "--option", "static_camera=top",
              "--option", "wrist_camera=wrist"])
    text = str(e.value.code)
    assert text.startswith(f"vitavla data check: FAILED: {root}/") and "\n" not in text
    assert message in text, text
    assert _snapshot(root) == before
    with pytest.raises(DataError):  # the reader itself raises the project's DataError
        r = LeRobotReader(root, static_camera="top", wrist_camera="wrist")
        for e, ep in enumerate(r.episodes):
            r.read(e, 0, ep.length)
