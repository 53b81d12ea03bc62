"""vitavla.console: third-party warnings, log records and __del__ errors go to the run's log file; ours stay
on the console."""

from __future__ import annotations

import logging
import os
import sys
import types
import warnings
from pathlib import Path

import lightning
import pytest

from vitavla import console

OURS = str(console.ROOT / "vitavla" / "some_module.py")
THEIRS = str(Path(lightning.__file__).parent / "some_module.py")  # an installed library's file


def run_as(filename: str, source: str, **env):
    """Run ``source`` as if it were code in ``filename`` (the frame the routing looks at)."""
    exec(compile(source, filename, "exec"), {"warnings": warnings, **env})


@pytest.fixture
def console_writer(monkeypatch):
    """What the console shows of warnings, as the interpreter's default showwarning would (pytest records
    warnings itself, so the previous showwarning is replaced by one that writes to stderr)."""
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)


def test_third_party_warnings_and_logs_go_to_the_file_ours_stay_on_stderr(tmp_path, capsys, console_writer):
    log = tmp_path / "run" / "quickstart.log"
    with warnings.catch_warnings(), console.routed(log) as router:
        warnings.simplefilter("always")
        run_as(THEIRS, "warnings.warn('a jsonargparse-like deprecation', DeprecationWarning)")
        run_as(OURS, "warnings.warn('our own warning', UserWarning)")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        logging.getLogger("robosuite_logs").warning("No private macro file found!")
        logging.getLogger("vitavla.rollout.lightning").warning("episode 3 crashed (attempt 1)")
        # Our callbacks announce results through Lightning's rank_zero_info: still ours.
        run_as(OURS, "from lightning.pytorch.utilities import rank_zero_info\n"
                     "rank_zero_info('rollout: success 0.400 over 10 episodes')")
        assert console.active() is router
    assert console.active() is None
    err = capsys.readouterr().err
    text = log.read_text()
    assert "our own warning" in err and "episode 3 crashed" in err and "rollout: success 0.400" in err
    for noise in ("a jsonargparse-like deprecation", "GPU available", "No private macro file"):
        assert noise in text and noise not in err
    assert "our own warning" not in text


def test_lines_before_the_run_directory_is_known_are_held_then_written(tmp_path, capsys):
    with console.routed() as router:
        logging.getLogger("jsonargparse").warning("parsed with a deprecated option")
        assert router.path is None
        router.attach(tmp_path / "fit.log")
        assert console.LOG_ENV in os.environ  # spawned simulator workers route there too
    assert "parsed with a deprecated option" in (tmp_path / "fit.log").read_text()
    assert "deprecated option" not in capsys.readouterr().err
    assert console.LOG_ENV not in os.environ


def test_a_console_handler_a_library_adds_while_routing_is_held_back_and_restored(tmp_path, capsys):
    logger = logging.getLogger("transformers")
    handler = logging.StreamHandler(sys.stderr)
    before = list(logger.handlers)
    try:
        with console.routed(tmp_path / "x.log"):
            logger.addHandler(handler)  # transformers adds its stderr handler on first use
            logger.warning("`past_key_values` is deprecated")
        assert "past_key_values" in (tmp_path / "x.log").read_text()
        assert "past_key_values" not in capsys.readouterr().err
        assert logger.handlers == [*before, handler]
    finally:
        logger.removeHandler(handler)


def test_verbose_routes_nothing(tmp_path):
    with console.routed(tmp_path / "x.log", verbose=True) as router:
        assert router is None and console.active() is None
    assert not (tmp_path / "x.log").exists()


def _unraisable(filename: str):
    """The hook arguments of an exception raised in a ``__del__`` defined in ``filename``."""
    ns = {}
    exec(compile("def free():\n    raise RuntimeError('EGLError(err = EGL_NOT_INITIALIZED)')", filename, "exec"), ns)
    try:
        ns["free"]()
    except RuntimeError as e:
        return types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__,
                                     err_msg="Exception ignored in", object="<EGLGLContext.__del__>")


def test_egl_teardown_errors_in_del_go_to_the_file(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    egl = str(Path(lightning.__file__).parents[1] / "robosuite" / "renderers" / "context" / "egl_context.py")
    with console.routed(tmp_path / "q.log"):
        sys.unraisablehook(_unraisable(egl))
        ours = _unraisable(OURS)
        sys.unraisablehook(ours)
    assert seen == [ours]  # ours reach the interpreter's hook (stderr)
    text = (tmp_path / "q.log").read_text()
    assert "EGL_NOT_INITIALIZED" in text and "egl_context.py" in text and "<EGLGLContext.__del__>" in text
    # After the command (interpreter teardown), third-party ones go to the last log file.
    monkeypatch.setattr(console, "_LAST_LOG", tmp_path / "exit.log")
    console.route_unraisable_at_exit()
    sys.unraisablehook(_unraisable(egl))
    assert "EGL_NOT_INITIALIZED" in (tmp_path / "exit.log").read_text() and seen == [ours]
