"""The scripted LIBERO pick-and-place expert: phase logic on a fake scene, the HDF5 writer against
LiberoReader, and (``sim``) one real demo generated and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.libero import LiberoReader
from vitavla.demos.libero_poses import _resolve_body, parse_pick_place_goal
from vitavla.demos.libero_scripted import Demo, DemoWriter
from vitavla.demos.pick_place_expert import (OSC_POS_LIMIT, ExpertConfig, Phase, PickPlaceExpert, ScenePoses,
                                             _rotation_error)

DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # (x, y, z, w): gripper pointing down, as LIBERO's Panda starts


class FakeScene:
    """Point-mass kinematics: the eef moves a fraction of each commanded delta; a closed gripper within
    2 cm of the object carries it; opening drops it onto the target."""

    def __init__(self, move: float = 0.6):
        self.eef = np.array([0.0, 0.0, 0.25])
        self.obj = np.array([0.10, -0.20, 0.03])  # grasp point; bottom 3 cm lower
        self.target, self.target_top = np.array([0.0, 0.25, 0.05]), 0.10
        self.move, self.held, self.closed = move, False, False

    def poses(self) -> ScenePoses:
        return ScenePoses(self.eef.copy(), DOWN.copy(), self.obj.copy(), float(self.obj[2] - 0.03),
                          self.target.copy(), self.target_top)

    def step(self, action: np.ndarray) -> None:
        self.eef = self.eef + self.move * OSC_POS_LIMIT * action[:3]
        closing = action[6] > 0
        if closing and not self.closed and np.linalg.norm(self.eef - self.obj) < 0.02:
            self.held = True
        if not closing:
            if self.held:
                self.obj = np.array([self.target[0], self.target[1], self.target_top + 0.03])
            self.held = False
        self.closed = closing
        if self.held:
            self.obj = self.eef.copy()


def run(expert: PickPlaceExpert, scene: FakeScene, steps: int = 400):
    log = []
    for _ in range(steps):
        p = scene.poses()
        a = expert.act(p)
        log.append((expert.phase, p.eef_pos, p.object_grasp, a))
        scene.step(a)
        if expert.phase == Phase.DONE or expert.failed:
            break
    return log


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_expert_phases_advance_in_order_and_place(noise):
    scene = FakeScene()
    cfg = ExpertConfig(noise=noise, waypoint_noise=0.005 if noise else 0.0)
    expert = PickPlaceExpert(cfg, rng=np.random.default_rng(0))
    log = run(expert, scene)
    phases = [ph for ph, *_ in log]
    assert not expert.failed and expert.phase == Phase.DONE
    assert sorted(set(phases)) == list(Phase)
    assert all(b - a in (0, 1) for a, b in zip(phases, phases[1:]))  # never skips or goes back
    actions = np.stack([a for *_, a in log])
    assert actions.min() >= -1.0 and actions.max() <= 1.0
    np.testing.assert_allclose(scene.obj[:2], scene.target[:2], atol=0.03)  # the object ended on the target


def test_clean_action_is_the_noise_free_command_of_the_same_state():
    """DART labels: with noise the executed action differs from the clean one by exactly the position noise,
    and the clean one equals what a noise-free expert in the same state and phase commands."""
    scene = FakeScene()
    noisy = PickPlaceExpert(ExpertConfig(noise=0.2), rng=np.random.default_rng(3))
    quiet = PickPlaceExpert(ExpertConfig())
    differs = 0
    for _ in range(30):
        p = scene.poses()
        executed, reference = noisy.act(p), quiet.act(p)
        differs += int(np.abs(executed[:3] - noisy.clean_action[:3]).max() > 1e-3)
        assert noisy.phase == quiet.phase
        np.testing.assert_array_equal(noisy.clean_action, reference)
        np.testing.assert_array_equal(executed[3:], noisy.clean_action[3:])  # only positions are perturbed
        scene.step(executed)  # both experts see the states the noisy execution leads to
    assert differs > 20  # the noise moves the executed positions (rarely masked by clipping at +-1)


def test_gripper_closes_only_when_aligned():
    scene = FakeScene()
    cfg = ExpertConfig()
    log = run(PickPlaceExpert(cfg), scene)
    first_close = next(i for i, (*_, a) in enumerate(log) if a[6] > 0)
    phase, eef, grasp, _ = log[first_close]
    assert phase == Phase.CLOSE
    assert np.linalg.norm(eef[:2] - grasp[:2]) < cfg.xy_tolerance and abs(eef[2] - grasp[2]) < cfg.z_tolerance
    assert all(a[6] < 0 for *_, a in log[:first_close])


def test_actions_far_from_the_goal_are_scaled_to_full_scale():
    scene = FakeScene()
    scene.eef = np.array([5.0, -5.0, 3.0])  # metres away: the raw P-term is ~100x full scale
    p = scene.poses()
    a = PickPlaceExpert(ExpertConfig()).act(p)
    assert a.shape == (7,) and np.all(np.abs(a) <= 1.0 + 1e-12)
    # Scaled as a whole, so the command still points straight at the approach waypoint.
    goal = p.object_grasp + [0.0, 0.0, ExpertConfig().approach_height]
    np.testing.assert_allclose(a[:3], (goal - p.eef_pos) / np.abs(goal - p.eef_pos).max())


def test_funnel_descends_only_as_the_gripper_lines_up():
    """With a funnel the approach has no hidden phase: the height goal falls with the horizontal error, so
    a gripper displaced sideways near the object is sent up and back, and the grasp still happens aligned."""
    cfg = ExpertConfig(funnel_radius=0.03)
    scene = FakeScene()
    log = run(PickPlaceExpert(cfg), scene)
    phases = [ph for ph, *_ in log]
    assert Phase.DESCEND not in phases and phases.count(Phase.CLOSE) == cfg.gripper_steps
    np.testing.assert_allclose(scene.obj[:2], scene.target[:2], atol=0.03)  # still placed
    # Before the grasp, the gripper never gets lower than the funnel allows at its horizontal error
    # (plus one step of travel and the controller's lag).
    for ph, eef, grasp, _ in log:
        if ph != Phase.ABOVE_OBJECT:
            break
        off = np.linalg.norm(eef[:2] - grasp[:2])
        assert eef[2] - grasp[2] >= cfg.approach_height * min(1.0, off / cfg.funnel_radius) - 0.02
    # 1.5 cm beside a gripper at grasp height (the policies' typical miss): the command rises and corrects.
    p = ScenePoses(np.array([0.10, -0.185, 0.03]), DOWN.copy(), np.array([0.10, -0.20, 0.03]), 0.0,
                   np.zeros(3), 0.1)
    a = PickPlaceExpert(cfg).act(p)
    # Goal: half the approach height (1.5 of 3 cm off), straight above the object; near the object the
    # command is scaled to slow_speed as a whole: (0, -0.3, 0.8) * 0.5 / 0.8.
    np.testing.assert_allclose(a[:3], [0.0, -0.1875, 0.5], atol=1e-9)
    assert a[6] < 0  # still open


def test_descend_xy_gain_scales_only_the_sideways_command_while_descending():
    """A gain of 3 triples the x/y label of a small sideways error in DESCEND and leaves z, the other phases
    and the default expert unchanged."""
    def command(gain: float, phase: Phase) -> np.ndarray:
        scene = FakeScene()
        scene.eef = scene.obj + [0.004, -0.002, 0.02]  # 4 mm / 2 mm off, 2 cm above the grasp point
        expert = PickPlaceExpert(ExpertConfig(descend_xy_gain=gain, xy_tolerance=0.001, z_tolerance=0.001))
        expert.phase = phase
        return expert.act(scene.poses())

    base, strong = command(1.0, Phase.DESCEND), command(3.0, Phase.DESCEND)
    np.testing.assert_allclose(base[:2], [-0.08, 0.04], atol=1e-9)  # error / 5 cm per full-scale step
    np.testing.assert_allclose(strong[:2], 3 * base[:2], atol=1e-9)
    assert strong[2] == pytest.approx(base[2]) and base[2] < 0  # still descending at the same rate
    np.testing.assert_array_equal(command(3.0, Phase.ABOVE_OBJECT), command(1.0, Phase.ABOVE_OBJECT))


def test_stuck_arm_times_out():
    scene = FakeScene(move=0.0)  # the arm never moves: the first waypoint is never reached
    expert = PickPlaceExpert(ExpertConfig(phase_timeout=20))
    log = run(expert, scene)
    assert expert.failed and expert.phase == Phase.ABOVE_OBJECT and len(log) == 21


def test_orientation_hold():
    np.testing.assert_allclose(_rotation_error(DOWN, DOWN), 0.0, atol=1e-12)
    c, s = np.cos(0.05), np.sin(0.05)  # current = DOWN rotated 0.1 rad about world z
    cur = np.array([c * 1.0, s * 1.0, 0.0, 0.0])  # q_z(0.1) * DOWN = (cos .05, sin .05, 0, 0) in xyzw
    err = _rotation_error(DOWN, cur)
    np.testing.assert_allclose(err, [0.0, 0.0, -0.1], atol=1e-9)  # rotate back about -z


def test_goal_parsing():
    assert parse_pick_place_goal([["in", "alphabet_soup_1", "basket_1_contain_region"]], "t") == (
        "alphabet_soup_1", "basket_1_contain_region")
    assert parse_pick_place_goal([("On", "akita_black_bowl_1", "plate_1")], "t") == ("akita_black_bowl_1",
                                                                                    "plate_1")
    with pytest.raises(ValueError, match="one \\(In obj target\\)"):
        parse_pick_place_goal([["open", "microwave_1"]], "open the microwave")
    with pytest.raises(ValueError, match="one \\(In obj target\\)"):
        parse_pick_place_goal([["in", "a", "b"], ["in", "c", "b"]], "two")
    names = ["basket_1", "alphabet_soup_1", "basket_10"]
    assert _resolve_body(names, "basket_1_contain_region", "t") == "basket_1"
    assert _resolve_body(names, "alphabet_soup_1", "t") == "alphabet_soup_1"
    with pytest.raises(ValueError, match="neither an object nor a region"):
        _resolve_body(names, "plate_1", "t")


def _fake_demo(i: int, t: int, size: int = 16) -> Demo:
    rng = np.random.default_rng(i)
    arrays = {"agentview_rgb": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
              "eye_in_hand_rgb": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
              "ee_states": rng.normal(size=(t, 6)), "gripper_states": rng.normal(size=(t, 2)),
              "joint_states": rng.normal(size=(t, 7)), "states": rng.normal(size=(t, 20)),
              "actions": rng.uniform(-1, 1, (t, 7))}
    arrays["executed_actions"] = np.clip(arrays["actions"] + rng.normal(0, 0.2, (t, 7)), -1, 1)
    return Demo(0, i, i, True, t, 1.0, arrays)


def test_files_record_their_recipe_and_refuse_other_settings(tmp_path):
    """A file remembers the generator settings; topping it up (or reusing it) with other ones is an error
    naming the file and each differing setting, and the file is left as it was."""
    from vitavla.demos.libero_hdf5 import recorded_recipe
    from vitavla.demos.libero_scripted import GenConfig, check_recipe

    path = tmp_path / "pick_up_the_soup_and_place_it_in_the_basket_demo.hdf5"
    cfg = GenConfig(noise=0.3, start_offset=0.04, descend_xy_gain=3.0)
    w = DemoWriter(path, {"language_instruction": "x"}, {"env_name": "x"}, "x.bddl", cfg.recipe())
    w.add(_fake_demo(0, 5))
    w.close(next_attempt=1)
    assert recorded_recipe(path)["descend_xy_gain"] == 3.0 and "workers" not in recorded_recipe(path)
    check_recipe(path, GenConfig(noise=0.3, start_offset=0.04, descend_xy_gain=3.0, workers=4, episodes=50))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="was recorded with other settings") as e:
        check_recipe(path, GenConfig(noise=0.2, start_offset=0.04))
    assert str(path) in str(e.value) and "noise=0.3 (this run: 0.2)" in str(e.value)
    assert "descend_xy_gain=3.0 (this run: 1.0)" in str(e.value) and "start_offset" not in str(e.value)
    assert path.read_bytes() == before
    # A file without a recipe (a LIBERO release) is not checked.
    check_recipe(tmp_path / "missing.hdf5", cfg)


def test_files_from_before_mesh_lod_count_as_full_detail(tmp_path):
    """Demos recorded before the recipe had ``mesh_lod`` were rendered at full mesh detail: a run with the
    new default (simplified meshes) refuses to mix into them, and a ``--full-render``-style run may."""
    from vitavla.demos.libero_scripted import GenConfig, check_recipe

    path = tmp_path / "old_demo.hdf5"
    old = {k: v for k, v in GenConfig().recipe().items() if k != "mesh_lod"}
    w = DemoWriter(path, {"language_instruction": "x"}, {"env_name": "x"}, "x.bddl", old)
    w.add(_fake_demo(0, 5))
    w.close(next_attempt=1)
    with pytest.raises(ValueError, match=r"mesh_lod=False \(this run: True\)"):
        check_recipe(path, GenConfig())
    check_recipe(path, GenConfig(mesh_lod=False))


def test_writer_round_trip_and_top_up(tmp_path):
    path = tmp_path / "pick_up_the_soup_and_place_it_in_the_basket_demo.hdf5"
    info = {"language_instruction": "pick up the soup and place it in the basket"}
    w = DemoWriter(path, info, {"env_name": "x"}, "x.bddl")
    demos = [_fake_demo(0, 5), _fake_demo(1, 7)]
    for d in demos:
        w.add(d)
    assert not path.exists()  # only the temp file until the run completes
    w.close(next_attempt=3)
    assert path.exists() and not path.with_name(path.name + ".tmp").exists()

    w = DemoWriter(path, info, {"env_name": "x"}, "x.bddl")  # a rerun tops the file up...
    assert w.kept == 2
    w.add(_fake_demo(2, 4))
    w.abort()  # ...but an interrupted one leaves it untouched
    reader = LiberoReader(path)
    assert [e.length for e in reader.episodes] == [5, 7]
    assert reader.episodes[0].instruction == info["language_instruction"]
    frames = reader.read(1, 0, 7)
    np.testing.assert_array_equal(frames.static, demos[1].arrays["agentview_rgb"])
    np.testing.assert_allclose(frames.action, demos[1].arrays["actions"].astype(np.float32))
    import h5py

    with h5py.File(path) as h:
        assert h["data"].attrs["next_attempt"] == 3 and h["data"].attrs["num_demos"] == 2
        assert json.loads(h["data"].attrs["problem_info"]) == info
        assert h["data/demo_1/obs/agentview_rgb"].compression == "gzip"
        # The labels are what the reader trains on; the executed commands are kept beside them for replays.
        np.testing.assert_array_equal(h["data/demo_1/executed_actions"][()], demos[1].arrays["executed_actions"])


@pytest.mark.sim
def test_generate_one_libero_demo(libero_demo):
    cfg, res = libero_demo  # tests/conftest.py: generate() with 1 episode of 32 px
    assert res.kept == 1 and res.path.name == "pick_up_the_alphabet_soup_and_place_it_in_the_basket_demo.hdf5"
    reader = LiberoReader(cfg.out)
    (ep,) = reader.episodes
    assert ep.instruction == "pick up the alphabet soup and place it in the basket"
    assert ep.length == res.steps[0] and 40 < ep.length < 200
    frames = reader.read(0, 0, ep.length)
    assert frames.static.shape == frames.wrist.shape == (ep.length, 32, 32, 3)
    assert frames.state.shape == (ep.length, 8)
    assert np.all(np.abs(frames.action) <= 1.0)
    assert frames.action[0, 6] == -1.0 and frames.action[-1, 6] == -1.0 and (frames.action[:, 6] == 1.0).any()
    from vitavla.demos.libero_hdf5 import recorded_recipe

    assert recorded_recipe(res.path) == cfg.recipe()  # what a rerun checks before topping the file up


@pytest.mark.sim
def test_start_offset_spreads_the_first_frames_and_demos_still_succeed(libero_demo, tmp_path):
    import h5py

    from vitavla.demos.libero_scripted import GenConfig, generate

    home_cfg, home_res = libero_demo  # same task and settling, no offset
    with h5py.File(home_res.path) as h:
        home = h["data/demo_0/obs/ee_pos"][0]
    r = 0.04
    cfg = GenConfig(suite=home_cfg.suite, tasks=home_cfg.tasks, episodes=2, max_attempts=4, out=str(tmp_path),
                    image_size=home_cfg.image_size, settle_steps=home_cfg.settle_steps, start_offset=r,
                    progress=False)
    (res,) = generate(cfg, log=lambda m: None)
    assert res.kept == 2
    with h5py.File(res.path) as h:
        first = np.stack([h[f"data/demo_{i}/obs/ee_pos"][0] for i in range(2)])
        actions = [h[f"data/demo_{i}/actions"][()] for i in range(2)]
    # Each demo starts away from home (within the box, plus what the OSC overshoots), not at the same pose.
    off = np.abs(first - home)
    assert np.all(off.max(axis=1) > 0.005) and np.all(off < r + 0.01)
    assert np.linalg.norm(first[0] - first[1]) > 0.005
    # The recorded part is still a whole pick and place: open, a grasp, open again.
    for a in actions:
        assert a[0, 6] == -1.0 and (a[:, 6] == 1.0).any() and a[-1, 6] == -1.0


def test_reach_action_points_at_the_goal_in_a_straight_line():
    from vitavla.demos.pick_place_expert import reach_action

    eef = np.array([0.0, 0.0, 0.2])
    near = reach_action(eef, eef + [0.01, -0.02, 0.0], DOWN, DOWN)
    np.testing.assert_allclose(near, [0.01 / OSC_POS_LIMIT, -0.02 / OSC_POS_LIMIT, 0, 0, 0, 0], atol=1e-12)
    # Beyond ``speed`` the command is scaled as a whole: the direction (a straight line) is kept.
    far = reach_action(eef, eef + [0.5, -0.25, 0.05], DOWN, DOWN, speed=0.5)
    np.testing.assert_allclose(far[:3], [0.5, -0.25, 0.05])


def _square(job):
    import time

    time.sleep(0.01 * (job[1] % 3))  # out-of-order completion: results must still come back in job order
    return job[1] ** 2


def test_ordered_results_keep_job_order_and_stop_a_skipped_task_within_the_window():
    from multiprocessing.pool import ThreadPool

    from vitavla.demos.libero_scripted import ordered_results

    skip, read = set(), []

    def jobs():
        for job in [(0, a) for a in range(30)] + [(3, a) for a in range(30, 36)]:
            if job[0] not in skip:
                read.append(job)
                yield job

    out = []
    with ThreadPool(2) as pool:
        for value in ordered_results(pool, _square, jobs(), window=4):
            out.append(value)
            if len(out) == 5:  # task 0 has what it needs: its later attempts must not start
                skip.add(0)
    task0 = [a for t, a in read if t == 0]
    assert task0 == list(range(8))  # 5 taken and the 3 still in the window of 4; imap would read all 30
    assert out == [a * a for a in task0] + [a * a for a in range(30, 36)]
