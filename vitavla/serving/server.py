"""``vitavla serve DIR``: an exported policy behind openpi's websocket protocol.

Protocol (what the unmodified ``openpi-client`` ``WebsocketClientPolicy`` speaks):

* the client opens a websocket (optionally with ``Authorization: Api-Key <token>``); the server first sends
  one msgpack map of metadata (robot spec, action chunk, image size, observation keys, units);
* then every binary frame the client sends is one observation (msgpack map, numpy arrays in openpi's
  ``msgpack_numpy`` layout, see :mod:`vitavla.serving.codec`) and the server answers it with one binary
  frame: ``{"actions": (C, action_dim) float32 in robot units, "gripper_prob": (C, gripper_dim),
  "episode_step": int, "server_timing": {...}}``;
* a bad observation is answered with a text frame (openpi's client raises it as ``RuntimeError``) and the
  connection stays usable; a message over ``max_message_mb`` closes the connection (code 1009).

Each connection is one episode session with its own :class:`~vitavla.streaming.StreamingPolicy` (KV cache).
An observation with ``reset: True`` (key configurable at export, ``obs_keys.reset``) starts a new episode.

Concurrency: the event loop only decodes, validates and encodes. Model work runs in one worker thread;
requests of all sessions that arrive within ``max_wait_ms`` of each other (or while the worker is busy) go
to it together, and their frames share one vision-tower pass (:mod:`vitavla.serving.runner`). GET
``/healthz`` answers ``OK`` without a websocket. SIGTERM/SIGINT: stop accepting, finish the requests in
flight, close, exit 0.

Backpressure: a connection's handler reads its next message only after its reply is written, websockets
reads at most :data:`MAX_QUEUED_MESSAGES` ahead and buffers at most 32 KiB of output per connection (the
kernel :data:`SEND_BUFFER_BYTES`), so a client that stops reading holds a bounded amount of server memory;
after ``send_timeout_s`` without progress its connection is dropped (session and KV cache freed).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np
import torch

from vitavla.serving.codec import ProtocolError, packb, unpackb
from vitavla.serving.export import ExportedPolicy, load_policy_dir
from vitavla.serving.runner import Batcher, PolicyRunner, Request, Session, SessionError

__all__ = ["Batcher", "ClientStalled", "PolicyRunner", "PolicyServer", "Request", "ServeConfig",
           "ServerThread", "Session", "SessionError", "main"]

log = logging.getLogger(__name__)

TOKEN_ENV = "VITAVLA_SERVE_TOKEN"
MAX_QUEUED_MESSAGES = 4
"""Messages websockets reads ahead of a connection's handler before it stops reading that socket. openpi's
client waits for each reply (one request in flight); more read-ahead would only hold up to this many
``max_message_mb`` messages per connection in memory (websockets' default is 16)."""


SEND_BUFFER_BYTES = 64 * 1024
"""Kernel send buffer of each connection. Replies are about half a kilobyte and a client has one request
in flight, so this is ample; left to Linux's autotuning (up to 4 MB) it would let a client that stopped
reading swallow thousands of replies, each a model step, before the write buffer fills and
``send_timeout_s`` can notice."""


WRITE_LIMIT_BYTES = 32 * 1024
"""websockets' write buffer high-water mark per connection (its default): past it a send waits for the client
to read, which is when ``send_timeout_s`` starts counting."""


class ClientStalled(Exception):
    """A reply that could not be written within ``send_timeout_s``: the client stopped reading."""


@dataclass
class ServeConfig:
    """Settings of ``vitavla serve``."""

    host: str = "127.0.0.1"
    """Interface to bind. The default accepts connections from this machine only; bind another address
    (e.g. the robot network's) deliberately, and then set a token."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    token: str | None = None
    """Shared secret that clients must send as ``Authorization: Api-Key <token>`` (openpi-client's
    ``api_key``); checked before the websocket opens. Default: the VITAVLA_SERVE_TOKEN environment
    variable (preferred: a command-line token shows in the process list), else no check."""
    max_batch: int = 16
    """Most requests (one per session) that share one policy call."""
    max_wait_ms: float = 2.0
    """How long the first request of a batch waits for other sessions' requests: the most latency that
    batching adds. No wait when every connected session already has its request in the batch."""
    max_message_mb: float = 32.0
    """Largest observation message accepted; a larger one closes that connection (websocket code 1009)."""
    max_image_side: int = 4096
    """Largest image height or width accepted."""
    device: str = "cpu"
    """Where the policy runs (``cpu``, ``cuda``, ``cuda:1``)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long to wait for the requests in flight before closing anyway."""
    handshake_timeout_s: float = 10.0
    """A connection that has not completed the websocket handshake by then is closed (slow or stalled
    clients cannot pile up half-open connections)."""
    send_timeout_s: float = 10.0
    """A reply (or close frame) that cannot be written for this long drops that connection: its client has
    stopped reading, so its socket buffers and the server's 32 KiB write buffer are full. Until then the
    server reads nothing more from it; other sessions are never held up."""
    torch_threads: int = 0
    """CPU threads for the policy (torch.set_num_threads); 0 keeps torch's default. On a CPU that other
    processes share, 1 avoids threads spinning against each other (the tiny policy ran 10-50x slower with
    2 threads than with 1 on a busy 2-core machine)."""


class PolicyServer:
    """The websocket front end: one :class:`Session` per connection, requests through one :class:`Batcher`."""

    def __init__(self, exported: ExportedPolicy, config: ServeConfig | None = None,
                 runner: PolicyRunner | None = None):
        self.exported = exported
        self.config = config or ServeConfig()
        self.runner = runner or PolicyRunner(exported)
        self.keys = exported.obs_keys
        self.robot = exported.robot
        self.metadata = self._metadata()
        self._connections: set = set()
        self._busy = 0
        self._draining = False
        self.port: int | None = None

    def _metadata(self) -> dict:
        spec, norm = self.exported.spec, self.exported.normalizer
        return {
            "server": "vitavla", "protocol": "openpi-websocket", "policy_format": spec["format"],
            "policy_version": spec["version"], "robot": asdict(self.robot),
            "action_dim": self.robot.action_dim, "action_chunk": self.robot.action_chunk,
            "state_dim": self.robot.state_dim, "image_size": self.exported.image_size,
            "history_length": self.exported.history_length, "obs_keys": self.keys,
            "action_units": spec.get("action_units", "robot"),
            "gripper_low": None if norm is None else list(norm.gripper_low),
            "gripper_high": None if norm is None else list(norm.gripper_high),
            "checkpoint_sha256": (spec.get("provenance") or {}).get("checkpoint_sha256"),
        }

    # -- request validation (event loop; cheap) --------------------------------------------------------
    def prepare(self, obs: Any, session: Session) -> Request:
        """A decoded message -> :class:`Request`, or :class:`ProtocolError` naming the key and what was
        expected. Runs before any model work."""
        keys, cfg = self.keys, self.config
        if not isinstance(obs, dict):
            raise ProtocolError(f"an observation must be a msgpack map of key -> value, got "
                                f"{type(obs).__name__}")
        needed = [*keys["views"], keys["state"], keys["prompt"]]
        missing = [k for k in needed if k not in obs]
        if missing:
            raise ProtocolError(f"missing observation key(s) {missing}; expected images {keys['views']} "
                                f"(uint8 H x W x 3), state {keys['state']!r} ({self.robot.state_dim} "
                                f"floats), "
                                f"prompt {keys['prompt']!r} (str)")
        views = []
        for k in keys["views"]:
            img = obs[k]
            if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
                    and img.shape[2] == 3):
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ProtocolError(f"observation key {k!r} must be a uint8 (H, W, 3) image, got {got}")
            if not (1 <= img.shape[0] <= cfg.max_image_side and 1 <= img.shape[1] <= cfg.max_image_side):
                raise ProtocolError(f"observation key {k!r} is {img.shape[0]} x {img.shape[1]}; height and "
                                    f"width must be in [1, {cfg.max_image_side}]")
            views.append(img)
        state = obs[keys["state"]]
        if isinstance(state, (list, tuple)):
            state = np.asarray(state)
        want = (self.robot.state_dim,)
        if not (isinstance(state, np.ndarray) and state.dtype.kind in "fiu" and state.shape == want):
            got = f"{state.dtype} {state.shape}" if isinstance(state, np.ndarray) else type(state).__name__
            raise ProtocolError(f"observation key {keys['state']!r} must be a numeric array of shape {want}, "
                                f"got {got}")
        bad = np.flatnonzero(~np.isfinite(state.astype(np.float64)))
        if bad.size:
            raise ProtocolError(f"observation key {keys['state']!r} has non-finite values (NaN or inf) at "
                                f"indices {bad.tolist()}")
        prompt = obs[keys["prompt"]]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProtocolError(f"observation key {keys['prompt']!r} must be a non-empty string, got "
                                f"{type(prompt).__name__} {prompt!r}"[:200])
        reset = obs.get(keys["reset"], False)
        if not isinstance(reset, (bool, np.bool_)):
            raise ProtocolError(f"observation key {keys['reset']!r} must be a bool, got "
                                f"{type(reset).__name__}")
        return Request(session, views, state.astype(np.float32), prompt, bool(reset))

    # -- websocket side --------------------------------------------------------------------------------
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        token = self.config.token
        if token:
            sent = request.headers.get("Authorization") or ""
            if not hmac.compare_digest(sent.encode(), f"Api-Key {token}".encode()):
                log.warning("refused a connection from %s: missing or wrong API key",
                            connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key (send Authorization: Api-Key <token>)\n")
        return None

    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        session = self.runner.new_session()
        self._connections.add(ws)
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        try:
            await self._send(ws, packb(self.metadata))
            async for message in ws:
                if self._draining:
                    await self._send(ws, "error: the server is shutting down; reconnect to another instance")
                    break
                self._busy += 1
                try:
                    await self._answer(ws, session, message)
                finally:
                    self._busy -= 1
        except (ConnectionClosed, ClientStalled):
            pass  # the client left, sent an oversize message or stopped reading: only this session ends
        finally:
            self._connections.discard(ws)

    async def _send(self, ws, message: bytes | str) -> None:
        """``ws.send`` with a deadline. It waits only when the client does not read (its socket buffers and
        our write buffer are full); past ``send_timeout_s`` the connection is aborted, since a close frame
        could not be written either, and :class:`ClientStalled` ends its handler."""
        timeout = self.config.send_timeout_s
        try:
            await asyncio.wait_for(ws.send(message), timeout)
        except TimeoutError:
            log.warning("dropping the connection from %s: it has not read its replies for %.1f s",
                        ws.remote_address, timeout)
            ws.transport.abort()
            raise ClientStalled(f"no reply written for {timeout} s") from None

    async def _answer(self, ws, session: Session, message) -> None:
        try:
            req = self.prepare(unpackb(message), session)
        except ProtocolError as e:
            await self._send(ws, f"error: {e}")
            return
        try:
            reply = await self._batcher.submit(req)
        except SessionError as e:
            await self._send(ws, f"error: {e}")
            return
        except Exception as e:  # a bug, not bad input: say so, end this session (as openpi does)
            log.exception("request failed")
            await self._send(ws, f"error: internal server error: {type(e).__name__}: {e}")
            await ws.close(1011, "internal server error")
            return
        reply["server_timing"]["server_ms"] = (time.perf_counter() - req.received) * 1000
        await self._send(ws, packb(reply))

    async def run(self, ready: Callable[[int], None] | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set, then drain (finish requests in flight) and return."""
        from websockets.asyncio.server import serve

        stop = stop or asyncio.Event()
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitavla-policy")
        self._batcher = Batcher(self.runner.run_batch, executor, self.config.max_batch,
                                self.config.max_wait_ms / 1000, lambda: len(self._connections))
        self._batcher.start()
        try:
            async with serve(self._handle, self.config.host, self.config.port, compression=None,
                             max_size=int(self.config.max_message_mb * 2**20),
                             open_timeout=self.config.handshake_timeout_s,
                             # A close frame is a write too: a client that cannot take it within
                             # send_timeout_s is aborted (shutdown does not wait websockets' 10 s).
                             close_timeout=self.config.send_timeout_s, max_queue=MAX_QUEUED_MESSAGES,
                             write_limit=WRITE_LIMIT_BYTES,
                             process_request=self._process_request) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info("serving %s on ws://%s:%d", self.exported.root, self.config.host, self.port)
                if ready is not None:
                    ready(self.port)
                await stop.wait()
                await self._drain(server)
        finally:
            await self._batcher.stop()
            executor.shutdown(wait=True)

    async def _drain(self, server) -> None:
        self._draining = True
        server.close(close_connections=False)  # no new connections; open ones finish their request
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while self._busy and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(ws.close(1001, "server shutting down") for ws in list(self._connections)),
                             return_exceptions=True)
        await server.wait_closed()


class ServerThread:
    """A :class:`PolicyServer` on its own event loop in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, server: PolicyServer, timeout: float = 60.0):
        self.server = server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="vitavla-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the policy server did not start: {self._error}")

    def _main(self) -> None:
        async def go():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.run(ready=lambda port: self._ready.set(), stop=self._stop)

        try:
            asyncio.run(go())
        except BaseException as e:  # surfaced by __init__ when it happens before ready
            self._error = e
            self._ready.set()
            raise

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


def main(argv: list[str] | None = None) -> None:
    """``vitavla serve DIR [--host 127.0.0.1] [--port 8000] [--token T] ...``"""
    from jsonargparse import ArgumentParser

    from vitavla.errors import UserFacingError

    try:
        import msgpack  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"vitavla serve needs the 'serve' extra: pip install -e '.[serve]' ({e})") from None

    from vitavla.lightning_cli import enable_attribute_docstrings

    enable_attribute_docstrings()  # the ServeConfig field docstrings become --help
    parser = ArgumentParser(prog="vitavla serve", description="Serve an exported policy directory over "
                            "openpi's websocket protocol (docs/deploy.md).")
    parser.add_argument("policy_dir", help="a directory written by `vitavla export`")
    parser.add_class_arguments(ServeConfig)
    args = parser.parse_args(argv)
    cfg = ServeConfig(**{f.name: args[f.name] for f in fields(ServeConfig)})
    if cfg.token is None:
        cfg.token = os.environ.get(TOKEN_ENV) or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        exported = load_policy_dir(args.policy_dir, device=cfg.device)
    except UserFacingError as e:
        raise SystemExit(f"vitavla: error: {type(e).__name__}: {e}") from None
    server = PolicyServer(exported, cfg)

    async def go():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.run(ready=lambda port: print(f"vitavla serve: ws://{cfg.host}:{port} ready", flush=True),
                         stop=stop)

    asyncio.run(go())
    print("vitavla serve: drained and stopped", flush=True)


if __name__ == "__main__":
    main()
