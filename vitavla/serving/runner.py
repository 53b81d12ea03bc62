"""The model side of ``vitavla serve``: one streaming session per connection, one batched policy call for
requests of many sessions (:class:`PolicyRunner`), and the dynamic batching that feeds it from the event loop
without ever running the model there (:class:`Batcher`)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from vitavla.rollout.env import Obs
from vitavla.rollout.episode import to_observation
from vitavla.rollout.executors import to_env_action
from vitavla.serving.export import ExportedPolicy
from vitavla.streaming import StreamingPolicy

log = logging.getLogger(__name__)


class SessionError(Exception):
    """A request that failed inside the model; its session's episode was reset."""


@dataclass
class Request:
    """One validated observation of one session."""

    session: "Session"
    views: list[np.ndarray]
    state: np.ndarray
    prompt: str
    reset: bool
    received: float = field(default_factory=time.perf_counter)


class Session:
    """One connection = one episode stream: its own KV cache, over the shared weights."""

    def __init__(self, exported: ExportedPolicy):
        self.policy = exported.streaming()
        self.step = 0


class PolicyRunner:
    """The model side. :meth:`run_batch` is only ever called from the one worker thread."""

    def __init__(self, exported: ExportedPolicy):
        self.exported = exported
        self.student = exported.policy.student
        self.normalizer = exported.normalizer
        self.image_size = exported.image_size

    def new_session(self) -> Session:
        return Session(self.exported)

    def _observation(self, req: Request):
        # The same conversion as `vitavla test` (resize, state normalization): the served policy sees what
        # it saw in closed-loop evaluation.
        obs = Obs(req.views[0], req.views[1], req.state, req.prompt)
        return to_observation(obs, self.image_size, normalizer=self.normalizer)

    @staticmethod
    def _reset(session: Session) -> None:
        session.policy.reset()
        session.step = 0

    def _step(self, sessions: list[Session], observations: list) -> list:
        """One vision pass over every frame, then one language-model call over every session's new step
        (:meth:`StreamingPolicy.step_many`). Should it fail, the sessions' caches may hold half a step:
        their episodes start over rather than continue wrong."""
        try:
            images = torch.cat([o.images for o in observations])
            embeds = self.student.embed_images(images[:, None])
            return StreamingPolicy.step_many([s.policy for s in sessions], observations,
                                             [embeds[j:j + 1] for j in range(len(sessions))])
        except Exception as e:
            log.exception("policy step failed")
            for s in sessions:
                self._reset(s)
            err = (f"{type(e).__name__}: {e} (this session's episode was reset: the next observation "
                   "starts a new one)")
            return [SessionError(err) for _ in sessions]

    @torch.no_grad()
    def run_batch(self, requests: list[Request]) -> list[dict | Exception]:
        """One policy call for requests of distinct sessions: one vision pass over all their frames and one
        language-model call over all their new steps, each row on its own cache. Returns a reply or an
        exception per request."""
        start = time.perf_counter()
        results: list[dict | Exception | None] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            try:
                if req.reset:
                    self._reset(req.session)
                ready.append((i, self._observation(req)))
            except Exception as e:  # a frame the resize rejects: that request only
                results[i] = SessionError(f"observation rejected: {e}")
        for i, obs in ready:
            held = requests[i].session.policy.instruction
            if held is not None and held != list(obs.instruction):
                self._reset(requests[i].session)
                results[i] = SessionError("the prompt changed mid-episode without reset=True (this session's "
                                          "episode was reset: the next observation starts a new one)")
        ready = [(i, obs) for i, obs in ready if results[i] is None]
        if ready:
            outs = self._step([requests[i].session for i, _ in ready], [o for _, o in ready])
            for (i, _), out in zip(ready, outs):
                req = requests[i]
                if isinstance(out, Exception):
                    results[i] = out
                    continue
                # Binary gripper, as the executors execute it (Seer: sigmoid > 0.5), then robot units.
                prob = out.gripper_prob[0].float()
                action = torch.cat([out.arm[0].float(), (prob > 0.5).float()], -1)
                results[i] = {"actions": to_env_action(action, self.normalizer),
                              "gripper_prob": prob.cpu().numpy().astype(np.float32),
                              "episode_step": req.session.step}
                req.session.step += 1
        infer_ms = (time.perf_counter() - start) * 1000
        for r in results:
            if isinstance(r, dict):
                r["server_timing"] = {"infer_ms": infer_ms, "batch_size": len(requests)}
        return results


class Batcher:
    """Dynamic batching with a bounded wait; the model runs in ``executor``, never on the event loop.

    A request waits at most ``max_wait`` seconds for others (none once ``expected()`` requests are in the
    batch: every connected session is already in it), or for the worker to finish the batch before.
    """

    def __init__(self, fn: Callable[[list], list], executor: ThreadPoolExecutor, max_batch: int,
                 max_wait: float, expected: Callable[[], int]):
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait, self.expected = max(1, max_batch), max(0.0, max_wait), expected
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, item) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.pending += 1
        try:
            self.queue.put_nowait((item, fut))
            return await fut
        finally:
            self.pending -= 1

    async def _loop(self) -> None:
        while True:
            try:
                await self._one_batch()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch stop the loop: every later request would hang
                log.exception("policy batch failed")

    async def _one_batch(self) -> None:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < min(self.max_batch, max(1, self.expected())):
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
        except Exception as e:  # a bug in fn itself: every request of the batch gets it
            results = [e] * len(batch)
        if len(results) != len(batch):
            results = [RuntimeError(f"the policy returned {len(results)} results for {len(batch)} "
                                    "requests")] * len(batch)
        for (item, fut), res in zip(batch, results):
            if fut.done():  # the client went away while the model ran
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                res.setdefault("server_timing", {})["queue_ms"] = (started - item.received) * 1000
                fut.set_result(res)
        # Returning drops this frame's references: while idle, the loop must not keep the last batch's
        # requests (and so their sessions and KV caches) alive after their clients have gone.
