"""`vitavla serve`: openpi's websocket protocol, driven by the unmodified openpi-client from PyPI."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitavla.rollout.env import Obs
from vitavla.rollout.runner import to_observation
from vitavla.serving.codec import packb, unpackb
from vitavla.serving.export import load_policy_dir
from vitavla.serving.server import PolicyRunner, PolicyServer, ServeConfig, ServerThread

from tests.serving.conftest import NORMALIZER, observations

openpi_client = pytest.importorskip("openpi_client", reason="pip install --no-deps openpi-client")
from openpi_client.action_chunk_broker import ActionChunkBroker  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tiny_export):
    return load_policy_dir(tiny_export[0])



@pytest.fixture(scope="module")
def server(exported):
    th = ServerThread(PolicyServer(exported, ServeConfig(port=0, torch_threads=1, max_wait_ms=100,
                                                         max_message_mb=1)))
    yield th
    th.stop()


def reference(exported, obs_list) -> list[np.ndarray]:
    """Action chunks of one in-process episode, as `vitavla test` computes them, in robot units."""
    policy = exported.streaming()
    chunks = []
    for o in obs_list:
        obs = Obs(o["observation/image"], o["observation/wrist_image"], o["observation/state"], o["prompt"])
        out = policy.step(to_observation(obs, exported.image_size, normalizer=exported.normalizer))
        action = torch.cat([out.arm[0], (out.gripper_prob[0] > 0.5).float()], -1)
        chunks.append(NORMALIZER.unnormalize_actions(action).numpy())
    return chunks


def test_openpi_client_gets_metadata_and_robot_unit_chunks(server, exported):
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert (meta["action_chunk"], meta["action_dim"], meta["state_dim"], meta["image_size"]) == (3, 7, 7, 224)
    assert meta["obs_keys"]["reset"] == "reset" and meta["action_units"] == "robot"
    obs = observations(5, seed=3)
    want = reference(exported, obs)
    got = [client.infer(o) for o in obs]
    for step, (g, w) in enumerate(zip(got, want)):
        assert g["actions"].dtype == np.float32 and g["actions"].shape == (3, 7)
        np.testing.assert_allclose(g["actions"], w, rtol=0, atol=1e-5)
        assert g["episode_step"] == step and g["gripper_prob"].shape == (3, 1)
    arm = np.stack([g["actions"] for g in got])
    assert ((arm[..., 4] >= 10) & (arm[..., 4] <= 20)).all()  # robot units: NORMALIZER maps dim 4 to [10, 20]
    assert set(np.unique(arm[..., 6])) <= {-1.0, 1.0}
    # `reset: True` starts a new episode on the same connection: the first step's chunk again, step 0.
    again = client.infer({**obs[0], "reset": True})
    assert again["episode_step"] == 0
    np.testing.assert_allclose(again["actions"], want[0], rtol=0, atol=1e-5)


def test_action_chunk_broker_queries_once_per_chunk(server):
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    broker = ActionChunkBroker(client, action_horizon=3)
    out = [broker.infer(o) for o in observations(6, seed=4)]
    assert [o["episode_step"] for o in out] == [0, 0, 0, 1, 1, 1]
    assert all(o["actions"].shape == (7,) for o in out)
    assert not np.array_equal(out[0]["actions"], out[1]["actions"])


def test_concurrent_sessions_share_batches_and_keep_their_own_episodes(server, exported):
    n, steps = 4, 3
    streams = [observations(steps, seed=10 + i) for i in range(n)]
    want = [reference(exported, s) for s in streams]
    clients = [WebsocketClientPolicy("127.0.0.1", server.port) for _ in range(n)]
    got: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        got[i] = [clients[i].infer(o) for o in streams[i]]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(n):
        for g, w in zip(got[i], want[i]):
            np.testing.assert_allclose(g["actions"], w, rtol=0, atol=1e-4)
        assert [g["episode_step"] for g in got[i]] == list(range(steps))
    assert max(g["server_timing"]["batch_size"] for r in got for g in r) > 1


ERRORS = [
    (b"\xc1", "error: the message is not valid msgpack"),
    (packb([1, 2]), "error: an observation must be a msgpack map of key -> value, got list"),
    (packb({"prompt": "x"}), "missing observation key(s) ['observation/image', 'observation/wrist_image', "
                             "'observation/state']"),
    ("a text frame", "error: expected a binary msgpack frame, got a str frame"),
]


def _bad(**change):
    return packb({**observations(1)[0], **change})


ERRORS += [
    (_bad(**{"observation/image": np.zeros((3, 32, 32), np.float32)}),
     "observation key 'observation/image' must be a uint8 (H, W, 3) image, got float32 (3, 32, 32)"),
    (_bad(**{"observation/state": np.zeros(8, np.float32)}),
     "observation key 'observation/state' must be a numeric array of shape (7,), got float32 (8,)"),
    (_bad(**{"observation/state": np.array([0, 0, np.nan, 0, 0, np.inf, 0], np.float32)}),
     "observation key 'observation/state' has non-finite values (NaN or inf) at indices [2, 5]"),
    (_bad(prompt=7), "observation key 'prompt' must be a non-empty string, got int 7"),
    (_bad(reset="yes"), "observation key 'reset' must be a bool, got str"),
]


def test_bad_messages_get_one_line_errors_and_the_session_goes_on(server, exported):
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
        unpackb(ws.recv())  # metadata
        for message, error in ERRORS:
            ws.send(message)
            reply = ws.recv()
            assert isinstance(reply, str) and error in reply, (error, reply)
        ws.send(packb(observations(1)[0]))
        ok = unpackb(ws.recv())
        assert ok["episode_step"] == 0
        np.testing.assert_allclose(ok["actions"], reference(exported, observations(1))[0], rtol=0, atol=1e-5)
        # A new instruction without reset fails inside the model: the episode restarts with the next step.
        ws.send(packb({**observations(1)[0], "prompt": "open the drawer"}))
        reply = ws.recv()
        assert "prompt changed mid-episode without reset=True" in reply and "episode was reset" in reply
        ws.send(packb({**observations(1)[0], "prompt": "open the drawer"}))
        assert unpackb(ws.recv())["episode_step"] == 0


def test_oversize_and_vanishing_clients_end_only_their_own_session(server):
    bystander = WebsocketClientPolicy("127.0.0.1", server.port)
    assert bystander.infer(observations(1)[0])["episode_step"] == 0
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:  # 3 MB > max_message_mb=1
        ws.recv()
        ws.send(_bad(**{"observation/image": np.zeros((1024, 1024, 3), np.uint8)}))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv()
        assert e.value.rcvd.code == 1009  # message too big
    for _ in range(3):  # a client that leaves with its request in flight
        ws = connect(f"ws://127.0.0.1:{server.port}")
        ws.recv()
        ws.send(packb(observations(1)[0]))
        ws.close()
    assert bystander.infer(observations(1)[0])["episode_step"] == 1


class SlowRunner(PolicyRunner):
    """The real runner, 0.8 s slower per batch, and counting its batches."""

    batches = 0

    def run_batch(self, requests):
        SlowRunner.batches += 1
        time.sleep(0.8)
        return super().run_batch(requests)


def test_token_is_checked_first_and_the_event_loop_never_waits_on_the_model(exported):
    cfg = ServeConfig(port=0, torch_threads=1, token="s3cret")
    th = ServerThread(PolicyServer(exported, cfg, runner=SlowRunner(exported)))
    try:
        with pytest.raises(InvalidStatus) as e:
            WebsocketClientPolicy("127.0.0.1", th.port)
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            WebsocketClientPolicy("127.0.0.1", th.port, api_key="wrong")
        assert SlowRunner.batches == 0
        client = WebsocketClientPolicy("127.0.0.1", th.port, api_key="s3cret")
        busy = threading.Thread(target=client.infer, args=(observations(1)[0],))
        busy.start()
        time.sleep(0.2)  # the model is now inside its 0.8 s batch
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", th.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        other = WebsocketClientPolicy("127.0.0.1", th.port, api_key="s3cret")
        assert other.get_server_metadata()["action_chunk"] == 3
        assert time.perf_counter() - start < 0.5  # the model batch takes 0.8 s
        busy.join(10)
        assert SlowRunner.batches == 1
    finally:
        th.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_answers_the_request_in_flight_then_exits(tiny_export):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "VITAVLA_SERVE_TOKEN": "from-env"}
    # Two sessions and a 1.5 s batching wait: the first request is in flight (waiting for the second
    # session) when SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "serve", str(tiny_export[0]),
                             "--port", str(port), "--max_wait_ms", "1500", "--torch_threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        line = ""
        while "ready" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "server exited before it was ready"
        with pytest.raises(InvalidStatus):  # the token comes from VITAVLA_SERVE_TOKEN
            WebsocketClientPolicy("127.0.0.1", port)
        idle = WebsocketClientPolicy("127.0.0.1", port, api_key="from-env")
        client = WebsocketClientPolicy("127.0.0.1", port, api_key="from-env")
        result = {}
        t = threading.Thread(target=lambda: result.update(client.infer(observations(1)[0])))
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["actions"].shape == (3, 7)
        assert proc.wait(30) == 0
        assert "drained and stopped" in proc.stdout.read()
        with pytest.raises(ConnectionClosed) as e:
            idle.infer(observations(1)[0])
        assert e.value.rcvd is None or e.value.rcvd.code == 1001
    finally:
        if proc.poll() is None:
            proc.kill()


def test_robot_loop_controllers_match_the_in_process_executors(server, exported):
    from vitavla.rollout.executors import ChunkExecutor, TemporalEnsembleExecutor
    from vitavla.rollout.runner import Controller
    from vitavla.serving.client import ChunkController, EnsembleController

    obs = observations(5, seed=21)
    pairs = ((EnsembleController, TemporalEnsembleExecutor()), (ChunkController, ChunkExecutor()))
    for remote, local in pairs:
        client = remote(WebsocketClientPolicy("127.0.0.1", server.port))
        ref = Controller(exported.streaming(), local, exported.normalizer, exported.image_size)
        for episode in range(2):  # the second episode checks that reset() starts the server's over too
            client.reset()
            ref.reset()
            for t, o in enumerate(obs):
                want = ref.act(t, Obs(o["observation/image"], o["observation/wrist_image"],
                                      o["observation/state"], o["prompt"]))
                np.testing.assert_allclose(client.act(o), want, rtol=0, atol=1e-5)
        assert client.queries == (10 if remote is EnsembleController else 4)


def test_robot_loop_example_runs(server, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import robot_loop
    finally:
        sys.path.remove(str(REPO / "examples"))
    robot_loop.main(["--port", str(server.port), "--mode", "chunk", "--hz", "1000", "--steps", "6"])
    assert "6 steps at 1000.0 Hz, 2 server queries" in capsys.readouterr().out


def test_a_simulator_through_the_server_acts_like_vitavla_test(server, exported):
    from vitavla.rollout.env import ScriptedStandInEnv
    from vitavla.rollout.executors import TemporalEnsembleExecutor
    from vitavla.rollout.runner import EpisodeSpec, run_episode
    from vitavla.serving.client import EnsembleController
    from vitavla.serving.sim_client import RemoteController, run_remote_episode

    env = ScriptedStandInEnv(num_task=2, steps=5, image_size=32, state_dim=7, act_dim=7)
    remote = RemoteController(EnsembleController(WebsocketClientPolicy("127.0.0.1", server.port)))
    for spec in (EpisodeSpec(0, 0), EpisodeSpec(1, 0)):
        here = run_episode(env, exported.streaming(), TemporalEnsembleExecutor(), spec, exported.normalizer,
                           exported.image_size)
        there = run_remote_episode(env, remote, spec)
        assert (there.success, there.steps, there.error) == (here.success, here.steps, None)
        np.testing.assert_array_equal(there.first_last[1], here.first_last[1])  # same trajectory, same end
    assert remote.queries == 10 and remote.seconds > 0


@pytest.mark.sim
def test_libero_episode_through_the_server(server):
    pytest.importorskip("libero.libero")
    from vitavla.rollout.libero_env import LiberoEnv
    from vitavla.rollout.runner import EpisodeSpec
    from vitavla.serving.client import ChunkController
    from vitavla.serving.sim_client import RemoteController, run_remote_episode

    env = LiberoEnv(suite="libero_object", protocol="seer", gripper_state="binary", max_steps=4,
                    settle_steps=1, render_size=64)
    try:
        remote = RemoteController(ChunkController(WebsocketClientPolicy("127.0.0.1", server.port)))
        res = run_remote_episode(env, remote, EpisodeSpec(0, 0))
    finally:
        env.close()
    assert res.error is None and res.steps == 4 and remote.queries == 2


def test_stalled_clients_do_not_hold_up_others(exported):
    th = ServerThread(PolicyServer(exported, ServeConfig(port=0, torch_threads=1, handshake_timeout_s=0.5)))
    try:
        # A client that stops half-way through its HTTP upgrade request, and one that stops half-way
        # through an observation frame (header says 4096 bytes, none follow).
        loris = socket.create_connection(("127.0.0.1", th.port))
        loris.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        half = connect(f"ws://127.0.0.1:{th.port}")
        half.recv()
        half.socket.sendall(b"\x82\xfe\x10\x00")
        client = WebsocketClientPolicy("127.0.0.1", th.port)
        start = time.perf_counter()
        assert [client.infer(o)["episode_step"] for o in observations(3)] == [0, 1, 2]
        assert time.perf_counter() - start < 5
        loris.settimeout(5)
        assert loris.recv(1024) == b""  # closed by the server after handshake_timeout_s
        loris.close()
        half.socket.close()
    finally:
        th.stop()


def tracked_runner(exported):
    """A PolicyRunner and a weak set of the sessions it has created and that are still alive."""
    import weakref

    runner = PolicyRunner(exported)
    alive = weakref.WeakSet()
    new_session = runner.new_session

    def tracked():
        session = new_session()
        alive.add(session)
        return session

    runner.new_session = tracked
    return runner, alive


def test_thousand_connect_disconnect_cycles_leave_no_session_behind(exported):
    import gc

    runner, alive = tracked_runner(exported)
    server = PolicyServer(exported, ServeConfig(port=0, torch_threads=1), runner=runner)
    th = ServerThread(server)
    try:
        def rss_mb() -> float:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        obs = packb(observations(1)[0])

        def cycles(n):
            for i in range(n):
                with connect(f"ws://127.0.0.1:{th.port}", compression=None) as ws:
                    ws.recv()
                    if i % 50 == 0:  # some sessions hold a KV cache when they go
                        ws.send(obs)
                        ws.recv()

        cycles(100)
        before = rss_mb()
        start = time.perf_counter()
        cycles(1000)
        seconds = time.perf_counter() - start
        for _ in range(100):
            if not server._connections:
                break
            time.sleep(0.02)
        gc.collect()
        assert not server._connections and len(alive) == 0
        growth = rss_mb() - before
        print(f"1000 cycles in {seconds:.1f} s, RSS growth {growth:+.1f} MB")
        assert growth < 20
    finally:
        th.stop()


class NonReader:
    """A websocket client that completes the handshake, then only sends: it never reads its socket again.
    Its receive buffer is made small so that the server's replies back up quickly."""

    def __init__(self, port: int, message: bytes):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:  # the 101 response; from here on, nothing is read
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        # One masked binary frame (RFC 6455 5.2); a zero mask leaves the payload as it is.
        n = len(message)
        if n < 126:
            size = bytes([0x80 | n])
        elif n < 2**16:
            size = bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            size = bytes([0x80 | 127]) + n.to_bytes(8, "big")
        self.frame = b"\x82" + size + b"\x00\x00\x00\x00" + message
        self.sent = 0
        self.ended = ""

    def flood(self, limit: int, block_s: float) -> None:
        """Send up to ``limit`` frames; stop when one blocks for ``block_s`` (backpressure) or fails."""
        self.sock.settimeout(block_s)
        try:
            for _ in range(limit):
                self.sock.sendall(self.frame)
                self.sent += 1
            self.ended = "sent all"
        except TimeoutError:
            self.ended = "blocked"
        except OSError as e:
            self.ended = type(e).__name__


def test_a_client_that_stops_reading_is_dropped_and_holds_up_no_one(exported, monkeypatch):
    import gc

    from vitavla.serving import server as server_module

    # A smaller kernel send buffer fills after fewer replies, so the drop does not wait on hundreds of model
    # steps, which a busy 2-core machine makes slow (the limit below must stay under websockets' keepalive).
    monkeypatch.setattr(server_module, "SEND_BUFFER_BYTES", 8 * 1024)
    monkeypatch.setattr(server_module, "WRITE_LIMIT_BYTES", 4 * 1024)  # likewise websockets' write buffer

    runner, alive = tracked_runner(exported)
    server = PolicyServer(exported, ServeConfig(port=0, torch_threads=1, send_timeout_s=1.0), runner=runner)
    th = ServerThread(server)
    try:
        bystander = WebsocketClientPolicy("127.0.0.1", th.port)
        stalled = NonReader(th.port, packb(observations(1)[0]))
        flood = threading.Thread(target=stalled.flood, args=(100_000, 3.0))
        flood.start()
        # While the stalled session is open, sample its write buffer: output held for a client that does not
        # read is bounded by websockets' write limit (4 KiB here) plus one reply.
        buffered, latencies, steps = [], [], []
        obs = observations(1, seed=5)[0]
        start = time.perf_counter()
        while len(server._connections) > 1 or time.perf_counter() - start < 0.5:
            # Before websockets' keepalive (20 s ping interval + 20 s timeout) would drop it.
            assert time.perf_counter() - start < 30, "the stalled connection was not dropped within 30 s"
            buffered += [ws.transport.get_write_buffer_size() for ws in list(server._connections)]
            t = time.perf_counter()
            steps.append(bystander.infer({**obs, "reset": not steps})["episode_step"])
            latencies.append(time.perf_counter() - t)
        dropped_after = time.perf_counter() - start
        flood.join(10)
        # The server stopped reading from it once its replies backed up, so the flood was held back by
        # TCP instead of buffered in the server; then the connection was dropped (reset or still blocked).
        assert stalled.ended in ("blocked", "ConnectionResetError", "BrokenPipeError"), stalled.ended
        assert stalled.sent < 100_000
        assert max(buffered) < 4096 + 4096  # the write limit plus one reply
        # The bystander was answered every step, in order, never waiting on the stalled client.
        assert steps == list(range(len(steps))) and len(steps) > 10
        assert max(latencies) < 1.0, max(latencies)
        gc.collect()
        assert len(alive) == 1  # the stalled session (and its KV cache) is gone; the bystander's remains
        print(f"stalled client: {stalled.sent} frames sent ({stalled.ended}), dropped after "
              f"{dropped_after:.1f} s; bystander: {len(steps)} steps, max latency "
              f"{max(latencies) * 1000:.0f} ms, max write buffer {max(buffered)} B")
        stalled.sock.close()
    finally:
        th.stop()
