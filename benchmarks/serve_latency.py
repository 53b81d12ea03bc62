"""Latency and throughput of ``vitavla serve`` over loopback, 1 / 4 / 16 concurrent clients, in one run.

    python benchmarks/serve_latency.py                      # tiny policy, CPU, 1 torch thread
    python benchmarks/serve_latency.py --policy DIR --device cuda --threads 0 --image-size 224

The server runs as a separate process (``vitavla serve``), as on a robot, so clients and server do not share
a GIL; the clients are threads of this process, each an openpi-client ``WebsocketClientPolicy`` (or, when
openpi-client is not installed, the same protocol through ``websockets`` + :mod:`vitavla.serving.codec`),
each running its own episode. Printed per client count: p50/p95/p99 round-trip latency, requests/s, the
mean batch size the server formed, and the server's own time per request split into model time
(``infer_ms``: the batched policy call) and the rest (decode, validation, queueing, encode).

Server overhead at 1 client = (p50 round trip - p50 in-process step) / p50 in-process step, where the
in-process step is the same policy called directly (``to_observation`` + ``StreamingPolicy.step``, what
``vitavla test`` runs), timed in this run before the server starts.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.normalization import Normalizer  # noqa: E402
from teachers.base import ActionHead  # noqa: E402
from vitavla.policy import VLAPolicy  # noqa: E402
from vitavla.rollout.env import Obs  # noqa: E402
from vitavla.rollout.runner import to_observation  # noqa: E402
from vitavla.serving.export import export_policy, load_policy_dir  # noqa: E402
from vitavla.student import ActionMapper, VLAStudent  # noqa: E402


def tiny_policy_dir(out: Path, image_size: int) -> Path:
    """The tiny InternVL student (eval_tiny.yaml's sizes) with a 64-wide action head, exported."""
    from vitavla.backbones.internvl import InternVLBackbone

    torch.manual_seed(0)
    backbone = InternVLBackbone(path="tiny", tokens_per_image=4, image_size=image_size)
    student = VLAStudent(backbone, max_steps=4)
    policy = VLAPolicy(student, ActionMapper(student.hidden_size, 64), ActionHead(64)).eval()
    return export_policy(policy, out, Normalizer.identity(6, 1, -1.0, 1.0))


def make_obs(rng: np.random.Generator, size: int, keys: dict, state_dim: int) -> dict:
    views = {k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in keys["views"]}
    return {**views, keys["state"]: rng.normal(size=state_dim).astype(np.float32),
            keys["prompt"]: "pick up the red block and place it in the drawer"}


def in_process_step_ms(policy_dir: Path, size: int, steps: int) -> float:
    exported = load_policy_dir(policy_dir)
    policy, keys = exported.streaming(), exported.obs_keys
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        o = make_obs(rng, size, keys, exported.robot.state_dim)
        obs = Obs(o[keys["views"][0]], o[keys["views"][1]], o[keys["state"]], o[keys["prompt"]])
        start = time.perf_counter()
        policy.step(to_observation(obs, exported.image_size, normalizer=exported.normalizer))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def client_factory():
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        return lambda port: WebsocketClientPolicy("127.0.0.1", port), "openpi-client"
    except ImportError:
        from websockets.sync.client import connect

        from vitavla.serving.codec import packb, unpackb

        class Client:
            def __init__(self, port):
                self.ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
                self.meta = unpackb(self.ws.recv())

            def infer(self, obs):
                self.ws.send(packb(obs))
                return unpackb(self.ws.recv())

        return Client, "websockets + vitavla codec"


def run_clients(make, port: int, n: int, requests: int, size: int, keys: dict, state_dim: int) -> dict:
    clients = [make(port) for _ in range(n)]
    lat: list[list[float]] = [[] for _ in range(n)]
    timing: list[list[dict]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def run(i):
        rng = np.random.default_rng(100 + i)
        obs = [make_obs(rng, size, keys, state_dim) for _ in range(requests)]
        barrier.wait()
        for j, o in enumerate(obs):
            start = time.perf_counter()
            out = clients[i].infer({**o, "reset": j == 0})
            lat[i].append(time.perf_counter() - start)
            timing[i].append(out["server_timing"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    warm = 2  # first requests of each client: cache allocation, thread pools
    ms = np.array([x for per in lat for x in per[warm:]]) * 1000
    st = [s for per in timing for s in per[warm:]]
    return {"clients": n, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99), "rps": n * requests / wall,
            "batch": statistics.mean(s["batch_size"] for s in st),
            "infer": statistics.median(s["infer_ms"] for s in st),
            "rest": statistics.median(s["server_ms"] - s["infer_ms"] for s in st)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", help="exported policy dir (default: export the tiny policy to a temp dir)")
    ap.add_argument("--image-size", type=int, default=224, help="side of the frames the clients send")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=30, help="requests per client")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads) if args.threads else torch.get_num_threads())

    tmp = tempfile.TemporaryDirectory()
    policy_dir = Path(args.policy) if args.policy else tiny_policy_dir(Path(tmp.name) / "policy", 224)
    exported = load_policy_dir(policy_dir)
    keys, state_dim = exported.obs_keys, exported.robot.state_dim
    step_ms = in_process_step_ms(policy_dir, args.image_size, 20) if args.device == "cpu" else float("nan")

    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "serve", str(policy_dir),
                             "--port", str(port), "--torch_threads", str(args.threads),
                             "--device", args.device,
                             "--max_wait_ms", str(args.max_wait_ms), "--max_batch", str(max(args.clients))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        while "ready" not in (line := proc.stdout.readline()):
            if not line and proc.poll() is not None:
                sys.exit("the server exited before it was ready")
        make, kind = client_factory()
        rows = [run_clients(make, port, n, args.requests, args.image_size, keys, state_dim)
                for n in args.clients]
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"vitavla serve over loopback: {policy_dir}, {args.image_size}px frames, device {args.device}, "
          f"server torch threads {args.threads}, clients: {kind}, {args.requests} requests per client")
    print(f"in-process policy step (to_observation + StreamingPolicy.step): p50 {step_ms:.2f} ms")
    print(f"{'clients':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'batch':>6} "
          f"{'infer ms':>9} {'server rest ms':>15}")
    for r in rows:
        print(f"{r['clients']:>7} {r['p50']:>8.2f} {r['p95']:>8.2f} {r['p99']:>8.2f} {r['rps']:>8.1f} "
              f"{r['batch']:>6.2f} {r['infer']:>9.2f} {r['rest']:>15.2f}")
    one = rows[0]
    if one["clients"] == 1:
        print(f"server overhead at 1 client: round trip vs in-process step "
              f"{(one['p50'] - step_ms) / step_ms:+.1%}; inside the server (decode, validate, queue, encode) "
              f"{one['rest'] / one['infer']:.1%} of the model call")
    base = one["rps"]
    for r in rows[1:]:
        print(f"throughput {r['clients']} clients / 1 client: {r['rps'] / base:.2f}x")


if __name__ == "__main__":
    main()
