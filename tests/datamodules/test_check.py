"""`vitavla data check`: a summary for each format, one clear failure for bad data, nothing written."""

import numpy as np
import pytest

from cli import main
from tests.conftest import make_demo, write_dataset, write_libero
from tests.datamodules.conftest import write_split


def _snapshot(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_check_calvin_split(tmp_path, capsys):
    split = tmp_path / "task_D_D" / "training"
    write_split(split, [(0, 19)], [(0, 9, "open the drawer"), (10, 19, "push the block")])
    before = _snapshot(tmp_path)
    summary = main(["data", "check", str(split), "--format", "calvin", "--option", "num_steps=4"])
    out = capsys.readouterr().out
    assert "OK" in out and "episodes:      2" in out and "frames:        20" in out
    assert "1 = open" in out  # the gripper convention is reported
    assert _snapshot(tmp_path) == before
    assert summary is None  # the CLI prints; it returns nothing


def test_check_libero_and_aloha(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    write_libero(path, {"demo_0": make_demo(12, 128, rng), "demo_1": make_demo(9, 128, rng)})
    main(["data", "check", str(path), "--format", "libero"])
    out = capsys.readouterr().out
    assert "episodes:      2" in out and "frames:        21" in out and "'open the drawer' x2" in out
    assert "static 128x128" in out

    write_dataset(tmp_path / "aloha", lengths=(9, 10), ids=(0, 1))
    main(["data", "check", str(tmp_path / "aloha"), "--format", "aloha", "--option", "instruction=fold"])
    out = capsys.readouterr().out
    assert "episodes:      2" in out and "frames:        19" in out


def test_check_reports_bad_data_with_file_and_key(tmp_path):
    path = tmp_path / "KITCHEN_SCENE1_open_the_drawer_demo.hdf5"
    demo = make_demo(12, 128, np.random.default_rng(0))
    demo["actions"][5, 2] = np.nan
    write_libero(path, {"demo_0": demo})
    with pytest.raises(SystemExit, match=r"FAILED: .*open_the_drawer_demo.hdf5.*actions"):
        main(["data", "check", str(path), "--format", "libero"])
    with pytest.raises(SystemExit, match="unknown format"):
        main(["data", "check", str(path), "--format", "rlds"])
