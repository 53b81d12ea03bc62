"""Render-only mesh simplification (vitavla.rollout.mesh_lod): fewer triangles, identical physics."""

from __future__ import annotations

import numpy as np
import pytest

from vitavla.rollout.mesh_lod import cluster_faces, simplify_render_meshes


def grid(n: int, size: float) -> tuple[np.ndarray, np.ndarray]:
    """A flat n x n grid of squares (2 triangles each) of side ``size``, corners unwelded as in textured
    meshes (3 vertices per triangle)."""
    xs = np.linspace(0.0, size, n + 1)
    tris = []
    for i in range(n):
        for j in range(n):
            a, b, c, d = ((xs[i], xs[j], 0), (xs[i + 1], xs[j], 0), (xs[i + 1], xs[j + 1], 0), (xs[i], xs[j + 1], 0))
            tris += [(a, b, c), (a, c, d)]
    vert = np.asarray(tris, dtype=np.float64).reshape(-1, 3)
    return vert, np.arange(len(vert)).reshape(-1, 3)


def test_a_cell_finer_than_the_mesh_keeps_every_triangle_and_its_corners_positions():
    vert, face = grid(4, 0.1)  # 2.5 cm squares
    rows, new = cluster_faces(vert, face, 0.001)
    np.testing.assert_array_equal(rows, np.arange(len(face)))
    # Corners may move to a welded twin, but only to one at the same place.
    np.testing.assert_allclose(vert[new], vert[face], atol=1e-12)


def test_a_coarse_cell_merges_small_triangles_and_drops_collapsed_and_repeated_ones():
    vert, face = grid(16, 0.1)  # 512 triangles of 6.25 mm
    rows, new = cluster_faces(vert, face, 0.025)  # 4 x 4 squares per cube
    assert 0 < len(rows) < len(face) // 8
    assert np.all(np.diff(rows) > 0)
    assert np.all((new[:, 0] != new[:, 1]) & (new[:, 1] != new[:, 2]) & (new[:, 0] != new[:, 2]))
    cubes = np.floor(vert[new] / 0.025).astype(int)
    keys = {tuple(sorted(map(tuple, c))) for c in cubes}
    assert len(keys) == len(rows)  # no two kept triangles span the same three cubes
    # The kept corners are original vertices: the surface stays where it was.
    assert np.all(vert[new][..., 2] == 0.0)


def test_cluster_faces_rejects_bad_input():
    vert, face = grid(2, 0.1)
    with pytest.raises(ValueError, match="cell must be > 0"):
        cluster_faces(vert, face, 0.0)
    with pytest.raises(ValueError, match=r"expected vert \(V, 3\)"):
        cluster_faces(vert[:, :2], face, 0.01)


def _model_xml(vert: np.ndarray, face: np.ndarray) -> str:
    v = " ".join(f"{x:.6f}" for x in vert.ravel())
    f = " ".join(str(i) for i in face.ravel())
    return f"""
<mujoco>
  <asset>
    <mesh name="fine" vertex="{v}" face="{f}"/>
    <mesh name="box" vertex="0 0 0  0.1 0 0  0 0.1 0  0 0 0.1  0.1 0.1 0  0.1 0 0.1  0 0.1 0.1  0.1 0.1 0.1"/>
  </asset>
  <worldbody>
    <geom type="plane" size="1 1 0.1"/>
    <body pos="0 0 0.3">
      <freejoint/>
      <geom type="mesh" mesh="box" density="500"/>
      <geom type="mesh" mesh="fine" contype="0" conaffinity="0" group="1"/>
    </body>
  </worldbody>
</mujoco>"""


def test_simplify_render_meshes_leaves_collision_meshes_and_physics_untouched():
    mujoco = pytest.importorskip("mujoco")
    vert, face = grid(16, 0.1)
    # Lift the grid into a bumpy surface so MuJoCo keeps it as given (a flat mesh is still a valid visual).
    vert[:, 2] = 0.002 * np.sin(40 * vert[:, 0]) * np.cos(40 * vert[:, 1])
    full = mujoco.MjModel.from_xml_string(_model_xml(vert, face))
    lod = mujoco.MjModel.from_xml_string(_model_xml(vert, face))
    fine = mujoco.mj_name2id(lod, mujoco.mjtObj.mjOBJ_MESH, "fine")
    box = mujoco.mj_name2id(lod, mujoco.mjtObj.mjOBJ_MESH, "box")
    box_faces = lod.mesh_face[lod.mesh_faceadr[box]:lod.mesh_faceadr[box] + lod.mesh_facenum[box]].copy()
    before, after = simplify_render_meshes(lod, untextured_cell=0.02)
    assert before == full.mesh_facenum[fine] == 512 and 0 < after < before // 4
    assert lod.mesh_facenum[fine] == after
    # The colliding box's mesh is left exact.
    assert lod.mesh_facenum[box] == full.mesh_facenum[box]
    np.testing.assert_array_equal(lod.mesh_face[lod.mesh_faceadr[box]:][:len(box_faces)], box_faces)
    # The body falls, lands and settles: the same states to the bit with and without simplification.
    states = []
    for model in (full, lod):
        data = mujoco.MjData(model)
        for _ in range(400):
            mujoco.mj_step(model, data)
        states.append(np.concatenate([data.qpos, data.qvel]))
    assert states[0][2] < 0.2  # it fell onto the plane
    np.testing.assert_array_equal(states[0], states[1])


@pytest.mark.sim
def test_libero_mesh_lod_renders_close_to_full_detail_with_identical_physics():
    """The same init state and actions in LIBERO with and without ``mesh_lod``: states equal to the bit,
    frames within a few pixel values on average, and every hard reset (a new MuJoCo model) simplified again."""
    pytest.importorskip("libero.libero")
    from vitavla.rollout.libero_env import LiberoEnv

    runs = []
    for lod in (False, True):
        env = LiberoEnv("libero_object", protocol="seer", render_size=64, max_steps=20, settle_steps=2,
                        flip_images=False, fast_render=True, mesh_lod=lod)
        try:
            frames, states, faces = [], [], []
            for episode in (0, 1):  # LiberoEnv hard-resets: the second episode runs on a rebuilt model
                obs = env.reset(0, episode)
                faces.append(int(env._env.env.sim.model._model.mesh_facenum.sum()))
                for k in range(4):
                    obs = env.step(np.array([0.3, -0.2, 0.1 * k, 0, 0, 0, -1.0]))[0]
                frames.append((obs.static.astype(int), obs.wrist.astype(int)))
                states.append(obs.state)
            runs.append((frames, states, faces))
        finally:
            env.close()
    (full_frames, full_states, full_faces), (lod_frames, lod_states, lod_faces) = runs
    for a, b in zip(full_states, lod_states):
        np.testing.assert_array_equal(a, b)
    for (s0, w0), (s1, w1) in zip(full_frames, lod_frames):
        assert 0 < np.abs(s0 - s1).mean() < 4 and np.abs(w0 - w1).mean() < 6
    assert full_faces[0] == full_faces[1] and lod_faces[0] == lod_faces[1] < 0.5 * full_faces[0]
