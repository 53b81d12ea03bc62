"""CALVIN adapter: :class:`CalvinSimEnv` implements :class:`~vitavla.rollout.calvin_protocol.CalvinEnv` over
``calvin_env`` (the PyBullet play-table simulator), plus the chain source of the long-horizon benchmark.

``calvin_env`` and ``calvin_models`` (package ``calvin_agent``) are not on PyPI; install them from GitHub
without their pinned dependencies (torch 1.13, Lightning 1.8 and ``pyhash``, which does not build on
Python >= 3.10; see docs/evaluation.md)::

    git clone --recurse-submodules https://github.com/mees/calvin.git
    pip install pybullet hydra-core omegaconf gym numpy-quaternion gitpython opencv-python scipy
    pip install --no-deps -e calvin/calvin_env -e calvin/calvin_models

``pyhash`` is replaced by :mod:`vitavla.rollout.pyhash_compat` (registered before ``calvin_agent`` is
imported, only when no real ``pyhash`` is installed). ``tacto`` is only needed for the tactile camera, which
the benchmark does not use.

What comes from where, as in ``calvin_agent/evaluation/evaluate_policy.py``:

* the simulator: ``calvin_env.envs.play_table_env.get_env(<dataset>/validation, show_gui=False)``, which
  reads the dataset's ``validation/.hydra/merged_config.yaml`` (scene, cameras, robot);
* the task oracle: ``calvin_env.envs.tasks.Tasks`` built from ``new_playtable_tasks.yaml`` (under
  ``calvin_models/conf/callbacks/rollout/tasks/``);
* the instruction of a subtask: the first phrasing in ``new_playtable_validation.yaml`` (under
  ``calvin_models/conf/annotations/``);
* the chains: ``calvin_agent.evaluation.multistep_sequences.get_sequences(1000)`` (seeded, deterministic),
  or a JSON file of ``[initial_state, [5 subtasks]]`` that pins the exact evaluation set;
* a chain's symbolic initial state (``{"led": 0, "slider": "right", ...}``) becomes ``robot_obs`` /
  ``scene_obs`` through ``calvin_agent.evaluation.utils.get_env_state_for_initial_condition``. A chain
  file written with ``--resolve-states`` stores those arrays, so evaluating it needs no ``calvin_models``.

Observations match :class:`datamodules.CalvinDataModule`: static = ``rgb_static`` (200 x 200), wrist =
``rgb_gripper`` (84 x 84), state = ``robot_obs[0:6]`` (TCP position + Euler angles) and the previous gripper
action ``robot_obs[14]`` mapped from -1 closed / +1 open to 0 / 1 (:func:`vitavla.layouts.calvin_state`, shared with the dataset reader).
Actions are CALVIN ``rel_actions``: 6 values in [-1, 1] then the gripper, sent as exactly -1 or +1 (calvin_env
asserts it).

Export the official chains once (needs calvin_models), then evaluate from the file::

    python -m vitavla.rollout.calvin_env export-chains eval_sequences.json --resolve-states
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vitavla.errors import ConfigError, MissingDependencyError
from vitavla.layouts import calvin_state
from vitavla.rollout import pyhash_compat
from vitavla.rollout.calvin_protocol import NUM_SUBTASKS, Chain, Oracle, calvin_oracle, load_chains
from vitavla.rollout.env import Obs

INSTALL_HINT = ("calvin_env and calvin_models are not on PyPI; install them from GitHub without their pinned "
                "dependencies: git clone --recurse-submodules https://github.com/mees/calvin.git && pip install "
                "pybullet hydra-core omegaconf gym numpy-quaternion gitpython opencv-python scipy && pip install "
                "--no-deps -e calvin/calvin_env -e calvin/calvin_models (no pyhash needed; see docs/evaluation.md)")
OFFICIAL_NUM_CHAINS = 1000
# sha256 of chains_digest's canonical JSON of get_sequences(1000): CALVIN's official evaluation set, the one
# GR-1, RoboFlamingo, Seer and VITA-VLA report on (calvin_models fa03f01, numpy's legacy RandomState).
OFFICIAL_CHAINS_SHA256 = "90191d9ac76baecb4f292ab766bbbf3ae65dbf43a83bbe5c376d99db10fd6446"
# Generating the 1000 chains takes minutes of CPU, so the verified set is kept here once generated.
CACHE_DIR = Path("~/.cache/vitavla")
CACHE_FILE = "calvin_official_chains.json"

log = logging.getLogger(__name__)
TASKS_CONFIG = Path("callbacks/rollout/tasks/new_playtable_tasks.yaml")
ANNOTATIONS_CONFIG = Path("annotations/new_playtable_validation.yaml")
MERGED_CONFIG = Path(".hydra/merged_config.yaml")
STATIC_SHAPE, WRIST_SHAPE = (200, 200, 3), (84, 84, 3)
ROBOT_OBS_DIM, SCENE_OBS_DIM = 15, 24
TASK_NAME = "calvin_long_horizon"


def _import(module: str, needed_for: str, hint: str = INSTALL_HINT):
    """``module``, or a :class:`MissingDependencyError` naming what needs it and how to install it (the
    underlying ImportError, e.g. a missing ``pybullet``, stays in the message)."""
    if module.split(".")[0] == "calvin_agent":
        pyhash_compat.install()  # calvin_agent.evaluation.utils imports pyhash at module level
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{needed_for} needs {module} ({type(e).__name__}: {e}). {hint}") from e


def default_conf_dir() -> Path | None:
    """``calvin_models/conf`` of an installed ``calvin_agent`` (found without importing it), else None."""
    try:
        spec = importlib.util.find_spec("calvin_agent")
    except (ImportError, ValueError):  # a broken install, or a module object without a spec
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent / "conf"


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e


def load_task_oracle(path: str | Path):
    """``calvin_env.envs.tasks.Tasks`` from a task config such as ``new_playtable_tasks.yaml``
    (``_target_: calvin_env.envs.tasks.Tasks`` and ``tasks: {name: [base_task, *args]}``)."""
    path = Path(path)
    cfg = _read_yaml(path, "CALVIN task config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("tasks"), Mapping) or not cfg["tasks"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'tasks' mapping (name -> [base task, "
                         "args...]), as in calvin_models/conf/callbacks/rollout/tasks/new_playtable_tasks.yaml")
    bad = [k for k, v in cfg["tasks"].items() if not (isinstance(v, list) and v and isinstance(v[0], str))]
    if bad:
        raise ValueError(f"{path}: tasks {bad[:5]} must be lists starting with a base task name, e.g. "
                         "[move_door_rel, base__drawer, 0.12]")
    target = cfg.get("_target_", "calvin_env.envs.tasks.Tasks")
    module, _, name = str(target).rpartition(".")
    cls = getattr(_import(module, f"the task oracle of {path}"), name, None)
    if cls is None:
        raise ValueError(f"{path}: _target_ {target!r} does not name a class")
    return cls(tasks=dict(cfg["tasks"]))


def load_instructions(path: str | Path) -> dict[str, str]:
    """Subtask -> instruction: the first phrasing of each key of ``new_playtable_validation.yaml``, the one
    the official evaluation uses (``val_annotations[subtask][0]``)."""
    path = Path(path)
    cfg = _read_yaml(path, "CALVIN annotations file")
    if not isinstance(cfg, Mapping) or not cfg:
        raise ValueError(f"{path}: expected a mapping subtask -> [instruction, ...]")
    out = {}
    for key, phrasings in cfg.items():
        if not (isinstance(phrasings, list) and phrasings and all(isinstance(p, str) for p in phrasings)):
            raise ValueError(f"{path}: key {key!r} must be a non-empty list of instruction strings, got "
                             f"{phrasings!r:.80}")
        out[str(key)] = phrasings[0].strip()
    return out


def env_state(initial_state: Any) -> tuple[np.ndarray, np.ndarray]:
    """(robot_obs (15,), scene_obs (24,)) to reset calvin_env with.

    Accepts a resolved state ``{"robot_obs": [...], "scene_obs": [...]}`` (from a chain file written with
    ``--resolve-states``) or a symbolic one (``get_sequences``' dicts), which needs calvin_models.
    """
    if isinstance(initial_state, Mapping) and "robot_obs" in initial_state and "scene_obs" in initial_state:
        robot = np.asarray(initial_state["robot_obs"], dtype=np.float64)
        scene = np.asarray(initial_state["scene_obs"], dtype=np.float64)
    elif isinstance(initial_state, Mapping):
        utils = _import("calvin_agent.evaluation.utils", "a symbolic CALVIN initial state",
                        INSTALL_HINT + "; or evaluate a chain file written with `python -m "
                        "vitavla.rollout.calvin_env export-chains --resolve-states`, which holds "
                        "robot_obs/scene_obs")
        robot, scene = (np.asarray(a, dtype=np.float64)
                        for a in utils.get_env_state_for_initial_condition(dict(initial_state)))
    else:
        raise ConfigError(f"a CALVIN initial state is a dict (symbolic, or with robot_obs and scene_obs), got "
                          f"{initial_state!r:.80}")
    if robot.shape != (ROBOT_OBS_DIM,) or scene.shape != (SCENE_OBS_DIM,):
        raise ConfigError(f"initial state: robot_obs must have shape ({ROBOT_OBS_DIM},) and scene_obs "
                          f"({SCENE_OBS_DIM},), got {robot.shape} and {scene.shape}")
    return robot, scene


def is_symbolic(initial_state: Any) -> bool:
    """A symbolic initial state (``get_sequences``' dict), which needs calvin_models to become arrays."""
    resolved = isinstance(initial_state, Mapping) and "robot_obs" in initial_state and "scene_obs" in initial_state
    return isinstance(initial_state, Mapping) and not resolved


def check_state_resolver(chains: list[Chain], source: str) -> None:
    """Fail at configuration time, not in the first rollout, when ``chains`` hold symbolic initial states and
    calvin_models cannot turn them into robot_obs / scene_obs."""
    if any(is_symbolic(c.initial_state) for c in chains):
        _import("calvin_agent.evaluation.utils", f"the symbolic initial states of {source}",
                INSTALL_HINT + "; or evaluate a chain file written with `python -m vitavla.rollout.calvin_env "
                "export-chains --resolve-states`, which holds robot_obs/scene_obs")


def load_calvin_chains(source: str | Path | None = None, num_chains: int | None = 1000) -> list[Chain]:
    """The evaluation chains: from ``source`` (an ``eval_sequences.json``-style file, first ``num_chains``
    of it; None takes all), or, with ``source=None``, the first ``num_chains`` of CALVIN's official 1000
    (calvin_models' ``get_sequences(1000)``).

    A subset is always a prefix of the official set: ``get_sequences(n)`` for n < 1000 spreads n chains over
    the initial states differently and shuffles them differently, so its chains are not among the 1000 that
    papers report on."""
    if num_chains is not None and num_chains < 1:
        raise ConfigError(f"num_chains must be >= 1, got {num_chains}")
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CALVIN chain file not found: {path}")
        try:
            chains = load_chains(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if num_chains is not None:
            if len(chains) < num_chains:
                raise ValueError(f"{path} holds {len(chains)} chains, num_chains asks for {num_chains}")
            chains = chains[:num_chains]
        return chains
    if num_chains is not None and num_chains > OFFICIAL_NUM_CHAINS:
        raise ConfigError(f"num_chains={num_chains}: CALVIN's official evaluation set has {OFFICIAL_NUM_CHAINS} "
                          "chains; evaluate more only from a chain file (data.init_args.chains)")
    return official_chains()[: num_chains or OFFICIAL_NUM_CHAINS]


def chains_digest(items: list) -> str:
    """sha256 of ``[[initial_state, [subtasks]], ...]`` as canonical JSON (sorted keys, no spaces)."""
    plain = [[c.initial_state, list(c.subtasks)] if isinstance(c, Chain) else [c[0], list(c[1])] for c in items]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def official_chains() -> list[Chain]:
    """CALVIN's official 1000 chains: ``get_sequences(1000)`` of calvin_models, checked against
    :data:`OFFICIAL_CHAINS_SHA256` and cached in ``CACHE_DIR`` once they match (a cached file is used only
    while its digest still matches). Chains that differ are returned with a warning and never cached."""
    cache = CACHE_DIR.expanduser() / CACHE_FILE
    try:
        items = json.loads(cache.read_text())
        if chains_digest(items) == OFFICIAL_CHAINS_SHA256:
            return load_chains(items)
    except (OSError, ValueError, TypeError, IndexError):
        pass  # no cache yet, or a damaged one: generate
    seqs = _import("calvin_agent.evaluation.multistep_sequences", "generating the CALVIN chains",
                   INSTALL_HINT + "; or pass a chain file")
    # get_sequences seeds numpy with 0 internally: the same 1000 chains on every machine.
    items = [[dict(state), list(tasks)] for state, tasks in seqs.get_sequences(OFFICIAL_NUM_CHAINS)]
    digest = chains_digest(items)
    if digest != OFFICIAL_CHAINS_SHA256:
        log.warning("calvin_models generated chains that are not CALVIN's official 1000 (sha256 %s, expected "
                    "%s): results will not compare with published ones; check the calvin_models version, or pass "
                    "the official eval_sequences.json as data.init_args.chains", digest[:12],
                    OFFICIAL_CHAINS_SHA256[:12])
        return load_chains(items)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(items) + "\n")
        tmp.replace(cache)  # atomic: a concurrent process reads the old file or the whole new one
    except OSError as e:
        log.warning("could not cache the CALVIN chains in %s: %s", cache, e)
    return load_chains(items)


def write_chains(path: str | Path, chains: list[Chain], resolve_states: bool = False) -> Path:
    """Write ``chains`` as JSON ``[[initial_state, [subtasks]], ...]`` (readable by :func:`load_chains`).

    ``resolve_states`` stores each state as ``{"condition": symbolic, "robot_obs": [...], "scene_obs":
    [...]}`` so evaluating the file needs neither calvin_models nor its hashing of conditions."""
    items = []
    for c in chains:
        state = c.initial_state
        if resolve_states and not (isinstance(state, Mapping) and "robot_obs" in state):
            robot, scene = env_state(state)
            state = {"condition": state, "robot_obs": robot.tolist(), "scene_obs": scene.tolist()}
        items.append([state, list(c.subtasks)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=1) + "\n")
    return path


# The env node of a CALVIN dataset's merged_config.yaml (PlayTableSimEnv's arguments): 240 Hz physics, 30 Hz
# control, robot / scene / cameras from their config groups. calvin_env's repository keeps it in conf/env/,
# which its .gitignore (env/) hides from some copies, so it is written out here.
SIM_CONFIG = """\
defaults:
  - cameras: static_and_gripper
  - scene: {scene}
  - robot: panda_longer_finger
  - _self_
seed: 0
data_path: {data_path}
env:
  _target_: calvin_env.envs.play_table_env.PlayTableSimEnv
  _recursive_: false
  cameras: ${{cameras}}
  seed: ${{seed}}
  bullet_time_step: 240.0
  use_vr: false
  show_gui: false
  robot_cfg: ${{robot}}
  scene_cfg: ${{scene}}
  use_scene_info: false
  use_egl: {use_egl}
  control_freq: 30
"""


def compose_sim_config(scene: str = "calvin_scene_D", use_egl: bool = False) -> Path:
    """A folder whose ``.hydra/merged_config.yaml`` configures the simulator as a CALVIN dataset's does
    (scene D, static 200 px and gripper 84 px cameras, ``panda_longer_finger``), composed from calvin_env's
    own ``conf/`` so that an evaluation needs no dataset download. Written under ``CACHE_DIR``."""
    package = _import("calvin_env", "composing the CALVIN simulator config")
    root = Path(package.__file__).resolve().parents[1]
    conf, data = root / "conf", root / "data"
    if not (conf / "scene" / f"{scene}.yaml").is_file() or not data.is_dir():
        raise MissingDependencyError(
            f"calvin_env at {root} has no conf/scene/{scene}.yaml or data/ (the scene files live next to the "
            "package, not in it): install calvin_env editable from its git checkout (pip install --no-deps -e "
            "calvin/calvin_env), or pass dataset_path")
    hydra = _import("hydra", "composing the CALVIN simulator config")
    from omegaconf import OmegaConf

    primary = SIM_CONFIG.format(scene=scene, data_path=json.dumps(str(data)), use_egl=str(bool(use_egl)).lower())
    from hydra.core.global_hydra import GlobalHydra

    # get_env may have initialized hydra in this process already; compose needs its own (get_env only checks
    # that one exists and initializes again when it does not).
    GlobalHydra.instance().clear()
    with _tempdir() as tmp:
        (Path(tmp) / "vitavla_calvin_sim.yaml").write_text(primary + f"hydra:\n  searchpath: [file://{conf}]\n")
        with hydra.initialize_config_dir(config_dir=str(tmp), version_base=None):
            cfg = hydra.compose("vitavla_calvin_sim")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    out = CACHE_DIR.expanduser() / "calvin_sim_config" / hashlib.sha256(text.encode()).hexdigest()[:16]
    target = out / MERGED_CONFIG
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = target.with_suffix(f".tmp{os.getpid()}")
        tmp_file.write_text(text)
        tmp_file.replace(target)
    return out


def _tempdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="vitavla_calvin_")


class CalvinSimEnv:
    """The CALVIN simulator as a :class:`~vitavla.rollout.calvin_protocol.CalvinEnv`, with its task oracle
    and instruction phrasings.

    The simulator starts on the first :meth:`reset` and again on the first reset after :meth:`close` (the
    rollout callback closes the env after a crash, since its state is no longer trusted).

    Args:
        dataset_path: CALVIN dataset root (e.g. ``.../task_ABC_D``) or its ``validation`` folder; the
            simulator is configured by ``validation/.hydra/merged_config.yaml`` (scene D for ABC->D). None:
            the same configuration composed from calvin_env's own ``conf/`` (:func:`compose_sim_config`),
            no dataset needed.
        scene: the scene composed when ``dataset_path`` is None (``calvin_scene_D``: the ABC->D test scene).
        conf_dir: ``calvin_models/conf`` holding the task and annotation configs (default: the installed
            ``calvin_agent``'s).
        tasks_config: task oracle config (default ``<conf_dir>/callbacks/rollout/tasks/new_playtable_tasks.yaml``).
        annotations_config: instruction phrasings (default ``<conf_dir>/annotations/new_playtable_validation.yaml``).
        show_gui: open PyBullet's GUI (debugging only).
        check_cameras: refuse camera sizes other than CALVIN's 200 x 200 static / 84 x 84 gripper, which
            the training data has; a different ``merged_config.yaml`` would silently shift the inputs.
    """

    num_tasks = 1
    action_dim = 7
    protocol = "calvin_long_horizon"

    def __init__(self, dataset_path: str | None = None, conf_dir: str | None = None,
                 tasks_config: str | None = None, annotations_config: str | None = None, show_gui: bool = False,
                 check_cameras: bool = True, scene: str = "calvin_scene_D"):
        # Kept to rebuild the env in simulator worker processes (and recorded in an evaluation's binding).
        self._args = {"dataset_path": dataset_path, "conf_dir": conf_dir, "tasks_config": tasks_config,
                      "annotations_config": annotations_config, "show_gui": show_gui,
                      "check_cameras": check_cameras, "scene": scene}
        if dataset_path is None:
            found = compose_sim_config(scene)
        else:
            root = Path(dataset_path).expanduser()
            candidates = [root / "validation", root]
            found = next((c for c in candidates if (c / MERGED_CONFIG).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"no {MERGED_CONFIG} in {candidates[0]} or {candidates[1]}: dataset_path "
                                        "must be a CALVIN dataset root (task_ABC_D, task_D_D, ...) or its "
                                        "validation folder")
        self.validation_dir = found
        conf = Path(conf_dir).expanduser() if conf_dir is not None else default_conf_dir()
        if conf is None and (tasks_config is None or annotations_config is None):
            raise ValueError("calvin_agent (calvin_models) is not installed: pass conf_dir (the checkout's "
                             "calvin_models/conf) or both tasks_config and annotations_config")
        self.tasks_config = Path(tasks_config).expanduser() if tasks_config else conf / TASKS_CONFIG
        self.annotations_config = (Path(annotations_config).expanduser() if annotations_config
                                   else conf / ANNOTATIONS_CONFIG)
        self.task_oracle = load_task_oracle(self.tasks_config)
        self.oracle: Oracle = calvin_oracle(self.task_oracle)
        self.instructions = load_instructions(self.annotations_config)
        self.known_subtasks = set(self.task_oracle.tasks)
        self.show_gui, self.check_cameras = show_gui, check_cameras
        # The simulator starts lazily, but a missing install must fail here, when the config is built,
        # rather than in every rollout as if the simulator had crashed.
        _import("calvin_env.envs.play_table_env", "CalvinSimEnv")
        self._env = None

    def __reduce__(self):
        # The task oracle holds closures and the simulator a PyBullet connection: neither pickles, so a
        # worker process (EnvPool) builds its own env from the constructor arguments.
        return _rebuild, (self._args,)

    def task_name(self, task_index: int) -> str:
        """The whole benchmark is one task whose episodes are chains (rollout-callback bookkeeping)."""
        if task_index != 0:
            raise IndexError(f"CalvinSimEnv has one task (index 0), got {task_index}")
        return TASK_NAME

    def instruction(self, subtask: str) -> str:
        try:
            return self.instructions[subtask]
        except KeyError:
            raise KeyError(f"subtask {subtask!r} has no phrasing in {self.annotations_config}") from None

    def _sim(self):
        if self._env is None:
            play_table = _import("calvin_env.envs.play_table_env", "CalvinSimEnv")
            self._env = play_table.get_env(self.validation_dir, show_gui=self.show_gui)
        return self._env

    def reset(self, initial_state: Any) -> Obs:
        robot_obs, scene_obs = env_state(initial_state)
        return self._obs(self._sim().reset(robot_obs=robot_obs, scene_obs=scene_obs))

    def step(self, action: np.ndarray) -> tuple[Obs, dict]:
        if self._env is None:
            raise RuntimeError("CalvinSimEnv.step before reset")
        # A float64 copy: calvin_env scales the relative action in place.
        a = np.array(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_dim,):
            raise ConfigError(f"CALVIN action must have 7 values (6 relative arm + gripper), got shape {a.shape}")
        a[6] = 1.0 if a[6] > 0 else -1.0  # calvin_env asserts the gripper is exactly -1 (close) or +1 (open)
        raw, _, _, info = self._env.step(a)
        return self._obs(raw), info

    def get_info(self) -> dict:
        if self._env is None:
            raise RuntimeError("CalvinSimEnv.get_info before reset")
        return self._env.get_info()

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()
            # PlayTableSimEnv.__del__ calls close() again, which disconnects an id pybullet has already
            # released ("pybullet.error: Not connected") when the object is collected; it is closed for good.
            env.close = _closed

    def _obs(self, raw: Mapping) -> Obs:
        try:
            static, wrist = raw["rgb_obs"]["rgb_static"], raw["rgb_obs"]["rgb_gripper"]
            robot_obs = np.asarray(raw["robot_obs"], dtype=np.float32)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"calvin_env observation lacks {e}: {self.validation_dir / MERGED_CONFIG} must enable "
                             "the static and gripper cameras (rgb_obs.rgb_static, rgb_obs.rgb_gripper)") from e
        static, wrist = np.asarray(static), np.asarray(wrist)
        if self.check_cameras and (static.shape != STATIC_SHAPE or wrist.shape != WRIST_SHAPE):
            raise ConfigError(f"camera sizes rgb_static {static.shape}, rgb_gripper {wrist.shape} differ from "
                             f"CALVIN's {STATIC_SHAPE} / {WRIST_SHAPE} that the policy was trained on (cameras in "
                             f"{self.validation_dir / MERGED_CONFIG}); pass check_cameras=False to accept them")
        if robot_obs.shape != (ROBOT_OBS_DIM,):
            raise ConfigError(f"calvin_env robot_obs has shape {robot_obs.shape}, expected ({ROBOT_OBS_DIM},) "
                             "(euler_obs: true, as in the CALVIN datasets)")
        return Obs(static, wrist, calvin_state(robot_obs[None])[0], "")


def _rebuild(args: dict) -> CalvinSimEnv:
    return CalvinSimEnv(**args)


def _closed() -> None:
    """Stands in for a closed PlayTableSimEnv's close (see :meth:`CalvinSimEnv.close`)."""


def main(argv: list[str] | None = None) -> None:
    """``python -m vitavla.rollout.calvin_env export-chains OUT.json [--num-chains N] [--resolve-states]``."""
    parser = argparse.ArgumentParser(prog="python -m vitavla.rollout.calvin_env",
                                     description="CALVIN evaluation helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-chains", help="write the official chains (calvin_models' get_sequences) "
                                                  "to a JSON file that pins the evaluation set")
    export.add_argument("out", help="output .json")
    export.add_argument("--num-chains", type=int, default=OFFICIAL_NUM_CHAINS,
                        help="the first N of the official 1000 chains")
    export.add_argument("--resolve-states", action="store_true",
                        help="store robot_obs/scene_obs so evaluating the file needs no calvin_models")
    args = parser.parse_args(argv)
    chains = load_calvin_chains(None, args.num_chains)
    path = write_chains(args.out, chains, resolve_states=args.resolve_states)
    print(f"wrote {len(chains)} chains of {NUM_SUBTASKS} subtasks to {path}")


if __name__ == "__main__":
    main()
