"""What a ``vitavla`` command prints: progress, results and our own warnings on the console; third-party
warnings, log records and teardown errors in a log file of the run.

``vitavla quickstart`` writes them to ``<out>/quickstart.log``, ``vitavla fit|validate|test|predict`` to
``<save_dir>/vitavla-<subcommand>.log`` (the logger's ``save_dir``, else ``trainer.default_root_dir``);
``--verbose`` leaves everything on the console.

Routing is scoped, not a blanket suppression:

* :func:`warnings.showwarning` is wrapped: a warning issued by code outside this repository's packages
  (Lightning, jsonargparse, transformers, ...) goes to the file; one issued by ``vitavla``, ``teachers``,
  ``datamodules`` or ``cli`` is shown as before.
* The loggers of the libraries we use (:data:`THIRD_PARTY_LOGGERS`) get one handler that writes to the file;
  handlers they add while routing is on (robosuite and Lightning add a console handler on import,
  transformers on first use) are held back and put back afterwards. A root handler sends any other
  third-party record to the file and our own (``vitavla.*``, ``datamodules.*``, ``teachers.*``) to stderr.
* :func:`sys.unraisablehook` sends third-party errors raised in ``__del__`` (robosuite's EGL contexts
  collected at interpreter exit) to the file.

Simulator worker processes inherit the file through :data:`LOG_ENV` and route into it too
(:func:`route_from_env`). Until the run's directory is known the routed lines are held in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("vitavla", "teachers", "datamodules", "cli")
_OWN_DIRS = tuple(str(ROOT / p) + os.sep for p in ("vitavla", "teachers", "datamodules"))
_OWN_FILES = (str(ROOT / "cli.py"),)
THIRD_PARTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                       "lightning_fabric", "transformers", "robosuite_logs", "robosuite", "libero",
                       "jsonargparse", "torch", "huggingface_hub", "OpenGL", "h5py", "urllib3", "PIL",
                       "matplotlib", "fsspec", "filelock", "absl")
LOG_ENV = "VITAVLA_THIRD_PARTY_LOG"

_ACTIVE: ConsoleRouter | None = None
_LAST_LOG: Path | None = None


def is_own_file(filename: str | None) -> bool:
    """Whether ``filename`` is a source file of this repository's packages (not an installed library's)."""
    if not filename:
        return False
    name = os.path.abspath(filename)
    if "site-packages" in name or "dist-packages" in name:
        return False
    return name.startswith(_OWN_DIRS) or name in _OWN_FILES


def is_own_logger(name: str) -> bool:
    return name.split(".")[0] in OWN_PACKAGES


def _warning_issuer(frame) -> str | None:
    """The file of the code that called ``warnings.warn`` (the first frame above ``warnings.py``)."""
    while frame is not None and (frame.f_code.co_filename.endswith("warnings.py")
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return None if frame is None else frame.f_code.co_filename


def _log_issuer() -> str | None:
    """The file that called Lightning's ``rank_zero_info``/``rank_zero_warn`` (ours announce results with
    them), found above the logging, rank-zero and routing frames of the current stack."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename in (logging.__file__, __file__)
                                 or os.path.basename(frame.f_code.co_filename) == "rank_zero.py"):
        frame = frame.f_back
    return None if frame is None else frame.f_code.co_filename


class _Stream(io.TextIOBase):
    """A text stream into the router (for a library's own console handler or prints)."""

    def __init__(self, router: ConsoleRouter):
        self.router = router

    def write(self, text: str) -> int:
        if text:
            self.router.write(text)
        return len(text)

    def writable(self) -> bool:
        return True


class _RouteHandler(logging.Handler):
    def __init__(self, router: ConsoleRouter):
        super().__init__()
        self.router = router
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if is_own_logger(record.name) or (record.name.endswith(".rank_zero") and is_own_file(_log_issuer())):
                sys.stderr.write(record.getMessage() + "\n")
            else:
                self.router.write(text + "\n")
        except Exception:
            self.handleError(record)


class ConsoleRouter:
    """Third-party warnings, log records and unraisable errors into a log file (see the module doc)."""

    def __init__(self):
        self.path: Path | None = None
        self._file = None
        self._pending: list[str] = []
        self.lines = 0
        self._handler = _RouteHandler(self)
        self._saved: dict[str, tuple[list, bool]] = {}
        self._held: dict[str, list] = {}
        self._showwarning = None
        self._unraisablehook = None
        self._env = None

    # -- where the lines go ------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        self.lines += text.count("\n")
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        else:
            self._pending.append(text)

    def attach(self, path: str | Path) -> Path:
        """Write to ``path`` (appending) from now on, starting with what was held until now."""
        global _LAST_LOG
        if self._file is not None:
            return self.path
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in uninstall
        self._file.write("".join(self._pending))
        self._file.flush()
        self._pending.clear()
        _LAST_LOG = self.path
        self._env = os.environ.get(LOG_ENV)
        os.environ[LOG_ENV] = str(self.path)  # spawned simulator workers route into the same file
        return self.path

    def stream(self) -> _Stream:
        return _Stream(self)

    # -- installing ----------------------------------------------------------------------------------------
    def install(self) -> ConsoleRouter:
        for name in THIRD_PARTY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = (list(logger.handlers), logger.propagate)
            self._held[name] = []
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.addHandler(self._handler)
            logger.propagate = False
            # A console handler the library adds on import or first use is held back until uninstall.
            logger.addHandler = self._held[name].append
        logging.getLogger().addHandler(self._handler)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._route_warning
        self._unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._route_unraisable
        return self

    def uninstall(self, failed: bool = False) -> None:
        global _ACTIVE
        if self._showwarning is None:
            return
        warnings.showwarning = self._showwarning
        sys.unraisablehook = self._unraisablehook
        self._showwarning = None
        logging.getLogger().removeHandler(self._handler)
        for name, (handlers, propagate) in self._saved.items():
            logger = logging.getLogger(name)
            del logger.addHandler
            logger.removeHandler(self._handler)
            for h in [*handlers, *self._held[name]]:
                logger.addHandler(h)
            logger.propagate = propagate
        if failed and self._pending:  # the run stopped before its directory was known: show what it said
            sys.stderr.write("".join(self._pending))
        self._pending.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._env is None:
                os.environ.pop(LOG_ENV, None)
            else:
                os.environ[LOG_ENV] = self._env
        if _ACTIVE is self:
            _ACTIVE = None

    # -- the hooks ---------------------------------------------------------------------------------------------
    def _route_warning(self, message, category, filename, lineno, file=None, line=None):
        issuer = _warning_issuer(sys._getframe(1))
        if file is not None or is_own_file(issuer) or (issuer is None and is_own_file(filename)):
            return self._showwarning(message, category, filename, lineno, file, line)
        self.write(warnings.formatwarning(message, category, filename, lineno, line))

    def _route_unraisable(self, args) -> None:
        if _is_own_traceback(args.exc_traceback):
            return self._unraisablehook(args)
        self.write(format_unraisable(args))


def _is_own_traceback(tb) -> bool:
    return any(is_own_file(frame.filename) for frame in traceback.extract_tb(tb)) if tb is not None else False


def format_unraisable(args) -> str:
    head = f"{args.err_msg or 'Exception ignored in'}: {args.object!r}\n"
    return head + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))


def active() -> ConsoleRouter | None:
    """The router of the running command, or None (``--verbose``, or a library call)."""
    return _ACTIVE


@contextlib.contextmanager
def routed(log: str | Path | None = None, verbose: bool = False):
    """Route third-party output while the block runs (to ``log``, or held until :meth:`ConsoleRouter.attach`).

    Nested use, and ``verbose``, leave the routing as it is; yields the active router or None.
    """
    global _ACTIVE
    if verbose or _ACTIVE is not None:
        if _ACTIVE is not None and log is not None:
            _ACTIVE.attach(log)
        yield _ACTIVE
        return
    router = _ACTIVE = ConsoleRouter().install()
    if log is not None:
        router.attach(log)
    failed = True
    try:
        yield router
        failed = False
    except SystemExit as e:  # --help, --print_config: a finished command, not a failed one
        failed = e.code not in (0, None)
        raise
    finally:
        router.uninstall(failed=failed)


def third_party_stdout():
    """A block whose stdout goes to the log file while routing is on (LIBERO ``print``\\ s its task order)."""
    router = _ACTIVE
    return contextlib.redirect_stdout(router.stream()) if router is not None else contextlib.nullcontext()


def third_party_stderr():
    """A block whose stderr goes to the log file while routing is on: a library that creates its console
    handler here (robosuite's, on import) logs into the file for the rest of the process."""
    router = _ACTIVE
    return contextlib.redirect_stderr(router.stream()) if router is not None else contextlib.nullcontext()


def route_from_env() -> ConsoleRouter | None:
    """In a simulator worker process: route into the parent's log file (:data:`LOG_ENV`), for the rest of
    the process. No-op when the parent does not route."""
    global _ACTIVE
    path = os.environ.get(LOG_ENV)
    if not path or _ACTIVE is not None:
        return _ACTIVE
    _ACTIVE = ConsoleRouter().install()
    _ACTIVE.attach(path)
    return _ACTIVE


def route_unraisable_at_exit() -> None:
    """For a command's process: third-party errors in ``__del__`` during interpreter teardown (after the
    command's own routing ended) go to the last log file, if there was one."""
    previous = sys.unraisablehook

    def hook(args):
        if _LAST_LOG is None or _is_own_traceback(args.exc_traceback):
            return previous(args)
        try:
            with open(_LAST_LOG, "a", encoding="utf-8") as f:
                f.write(format_unraisable(args))
        except Exception:
            previous(args)

    sys.unraisablehook = hook
