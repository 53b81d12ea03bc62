"""``vitavla data check PATH --format calvin|libero|aloha|lerobot``: read a whole dataset once, summarize it;
``vitavla data convert PATH --format libero|aloha|calvin --to lerobot --out DIR``: rewrite one as LeRobot v3.

Every frame of every episode goes through the format's reader, so anything the training loader would trip
over (missing keys, wrong shapes, NaN, truncated files, length mismatches) is reported up front with the
file and key, instead of hours into a run. Nothing on disk is written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import yaml

from datamodules.base import DataError, EpisodeReader
from vitavla.errors import UserFacingError

READERS = {
    "calvin": "datamodules.calvin:CalvinReader",
    "libero": "datamodules.libero:LiberoReader",
    "aloha": "datamodules.aloha:AlohaReader",
    "lerobot": "datamodules.lerobot:LeRobotReader",
}
TARGETS = ("lerobot",)


@dataclass
class Summary:
    episodes: int = 0
    frames: int = 0
    instructions: dict[str, int] = field(default_factory=dict)
    image_sizes: set = field(default_factory=set)
    action_min: np.ndarray | None = None
    action_max: np.ndarray | None = None
    state_min: np.ndarray | None = None
    state_max: np.ndarray | None = None
    gripper_convention: str = ""

    def add(self, frames) -> None:
        self.frames += len(frames.action)
        self.image_sizes.add(("static", frames.static.shape[1:3]))
        self.image_sizes.add(("wrist", frames.wrist.shape[1:3]))
        for name, arr in (("action", frames.action), ("state", frames.state)):
            lo, hi = arr.min(0), arr.max(0)
            cur_lo, cur_hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            setattr(self, f"{name}_min", lo if cur_lo is None else np.minimum(cur_lo, lo))
            setattr(self, f"{name}_max", hi if cur_hi is None else np.maximum(cur_hi, hi))

    def format(self) -> str:
        fmt = lambda a: "[" + ", ".join(f"{v:+.3f}" for v in a) + "]"  # noqa: E731
        top = sorted(self.instructions.items(), key=lambda kv: -kv[1])[:5]
        lines = [
            f"episodes:      {self.episodes}",
            f"frames:        {self.frames}",
            f"instructions:  {len(self.instructions)} distinct; most common: "
            + "; ".join(f"{s!r} x{n}" for s, n in top),
            "images:        " + ", ".join(f"{v} {h}x{w}" for v, (h, w) in sorted(self.image_sizes)),
            f"action min:    {fmt(self.action_min)}",
            f"action max:    {fmt(self.action_max)}",
            f"state min:     {fmt(self.state_min)}",
            f"state max:     {fmt(self.state_max)}",
            f"gripper:       {self.gripper_convention or 'not stated by the reader'}",
        ]
        return "\n".join(lines)


def summarize(reader: EpisodeReader, chunk: int = 256) -> Summary:
    """Read every frame through ``reader`` (in chunks, to bound memory) and collect the summary."""
    s = Summary(episodes=len(reader.episodes), gripper_convention=getattr(reader, "gripper_convention", ""))
    for i, ep in enumerate(reader.episodes):
        s.instructions[ep.instruction] = s.instructions.get(ep.instruction, 0) + 1
        for start in range(0, ep.length, chunk):
            s.add(reader.read(i, start, min(ep.length, start + chunk)))
    if s.frames == 0:
        raise DataError(reader.root, "episodes", "the dataset holds no frames")
    return s


def build_reader(fmt: str, path: str, options: list[str]) -> EpisodeReader:
    if fmt not in READERS:
        raise SystemExit(f"vitavla data check: unknown format {fmt!r}; expected one of {sorted(READERS)}")
    module, name = READERS[fmt].split(":")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep:
            raise SystemExit(f"vitavla data check: --option {opt!r} must look like key=value")
        kwargs[key] = yaml.safe_load(value)  # "4" -> 4, "false" -> False, "null" -> None, text stays text
    return cls(path, **kwargs)


def main(argv: list[str]) -> Summary | None:
    ap = argparse.ArgumentParser(prog="vitavla data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a dataset and print a summary")
    conv = sub.add_parser("convert", help="rewrite a dataset in another format (LeRobot v3)")
    for p in (check, conv):
        p.add_argument("path")
        p.add_argument("--format", required=True, help="one of: " + ", ".join(sorted(READERS)))
        p.add_argument("--option", action="append", default=[],
                       help="reader option key=value, e.g. --option arms=left (repeatable)")
    conv.add_argument("--to", required=True, choices=TARGETS, help="output format")
    conv.add_argument("--out", required=True, help="new dataset directory (must not exist or be empty)")
    conv.add_argument("--fps", type=int, default=None,
                      help="recording rate; default by source format (libero 20, aloha 50, calvin 30)")
    conv.add_argument("--cameras", nargs=2, default=None, metavar=("STATIC", "WRIST"),
                      help="camera names of the two views (features observation.images.<name>); default: the "
                           "source's camera names (aloha) or image/wrist_image")
    conv.add_argument("--vcodec", default=None,
                      help="video encoder: libsvtav1 (lerobot's default; used when available), libx264, or "
                           "libx264rgb for lossless")
    conv.add_argument("--crf", type=int, default=None, help="encoder quality (lower = better; 0 = lossless)")
    conv.add_argument("--pix-fmt", default=None, help="pixel format (yuv420p; rgb24 with libx264rgb)")
    conv.add_argument("--gop", type=int, default=2, help="keyframe interval in frames")
    conv.add_argument("--episodes-per-file", type=int, default=1000,
                      help="episodes per data parquet / mp4 file")
    args = ap.parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    try:
        reader = build_reader(args.format, args.path, args.option)
        summary = summarize(reader)
    except DataError as e:
        sys.exit(f"vitavla data check: FAILED: {e}")
    except UserFacingError as e:  # e.g. the format's optional dependencies are not installed
        sys.exit(f"vitavla data check: {e}")
    print(f"{args.format} dataset at {args.path}: OK")
    print(summary.format())
    return summary


def _convert(args) -> None:
    from datamodules.lerobot_write import FPS, convert, default_video_options, reader_options

    if args.format == "lerobot":
        raise SystemExit("vitavla data convert: the source is already LeRobot v3")
    try:
        reader = build_reader(args.format, args.path, args.option)
        video = default_video_options()
        for name, value in (("vcodec", args.vcodec), ("crf", args.crf), ("pix_fmt", args.pix_fmt),
                            ("gop", args.gop)):
            if value is not None:
                setattr(video, name, value)
        if args.cameras:
            cameras = tuple(args.cameras)
        elif args.format == "aloha":
            cameras = (reader.static_camera, reader.wrist_camera)
        else:
            cameras = ("image", "wrist_image")  # the names of the published LIBERO LeRobot datasets
        print(f"vitavla data convert: {args.format} {args.path} -> lerobot v3 {args.out} "
              f"({video.vcodec}, {video.pix_fmt}, crf {video.crf}, gop {video.gop})")
        out = convert(reader, args.out, args.fps or FPS[args.format], cameras=cameras, video=video,
                      episodes_per_file=args.episodes_per_file, robot_type=args.format)
    except DataError as e:
        sys.exit(f"vitavla data convert: FAILED: {e}")
    except UserFacingError as e:
        sys.exit(f"vitavla data convert: {e}")
    opts = reader_options(reader, cameras)
    print(f"wrote {len(reader.episodes)} episodes to {out}; read it back with")
    print("  data:\n    class_path: datamodules.LeRobotDataModule\n    init_args:")
    print(f"      root: {out}")
    for k, v in opts.items():
        print(f"      {k}: {json.dumps(v)}")
