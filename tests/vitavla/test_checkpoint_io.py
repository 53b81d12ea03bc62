"""Checkpoint files under faults: atomic saves, a full disk, truncated files, unwritable directories."""

import errno
import io

import pytest
import torch

from datamodules.normalization import cached_normalizer
from vitavla.checkpoint_io import (AtomicCheckpointIO, CheckpointReadError, CheckpointSaveError, atomic_save,
                                   read_state_dict)
from vitavla.errors import UserFacingError, writable_dir


def ckpt(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def disk_full_after(fraction: float, monkeypatch):
    """torch.save that writes ``fraction`` of the bytes, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: int(len(buf.getvalue()) * fraction)])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def load(path):
    return AtomicCheckpointIO().load_checkpoint(path, weights_only=True)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fraction):
    io_plugin, last = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint(ckpt(1), last)
    disk_full_after(fraction, monkeypatch)
    with pytest.raises(CheckpointSaveError, match=r"could not save checkpoint .*last.ckpt: No space left on "
                                                  r"device; the previous last.ckpt is unchanged") as err:
        io_plugin.save_checkpoint(ckpt(2), last)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    back = load(last)
    assert back["global_step"] == 1 and torch.equal(back["state_dict"]["w"], ckpt(1)["state_dict"]["w"])
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_failed_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    atomic_save(ckpt(1), last)

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("vitavla.checkpoint_io.os.fsync", fsync)
    with pytest.raises(CheckpointSaveError, match="Input/output error; the previous last.ckpt is unchanged"):
        atomic_save(ckpt(2), last)
    monkeypatch.undo()
    assert load(last)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_successful_save_replaces_and_first_failed_save_writes_nothing(tmp_path, monkeypatch):
    io_plugin, last = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    disk_full_after(0.5, monkeypatch)
    with pytest.raises(CheckpointSaveError, match="no file was written"):
        io_plugin.save_checkpoint(ckpt(1), last)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    io_plugin.save_checkpoint(ckpt(1), last)
    io_plugin.save_checkpoint(ckpt(2), last)
    assert load(last)["global_step"] == 2 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_file_is_named_by_every_reader(tmp_path):
    good = tmp_path / "good.ckpt"
    atomic_save(ckpt(1), good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointReadError, match=r"cut.ckpt cannot be read with torch.load.*truncated"):
        load(cut)
    with pytest.raises(CheckpointReadError, match=r"cut.ckpt cannot be read with torch.load\(weights_only=True\)"):
        read_state_dict(cut)  # the init_from / teacher path
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load(tmp_path / "missing.ckpt")


def test_unwritable_directories_fail_naming_the_key(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserFacingError, match=r"^data.init_args.out_dir: .*a_file/out is not a writable directory"):
        writable_dir(blocker / "out", "data.init_args.out_dir")
    assert writable_dir(tmp_path / "new" / "dir", "k").is_dir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("vitavla.errors.tempfile.TemporaryFile", read_only)  # root ignores chmod; fake a ro mount
    with pytest.raises(UserFacingError, match=r"stats_cache_dir: .* is not a writable directory \(Read-only"):
        writable_dir(tmp_path, "data.init_args.stats_cache_dir")


def test_unwritable_stats_cache_fails_before_the_statistics_pass(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    calls = []
    with pytest.raises(UserFacingError, match=r"data.init_args.stats_cache_dir: .*a_file/cache"):
        cached_normalizer(blocker / "cache", "fp", lambda: calls.append(1))
    assert calls == []  # nothing computed before the check
