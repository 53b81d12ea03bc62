"""Render-only level of detail for MuJoCo meshes: fewer triangles for cameras that see the scene at 56-256 px.

On software OpenGL (llvmpipe) a LIBERO render costs in proportion to the triangles it draws, not the pixels:
the libero_object scene draws about 310k triangles per camera (the scanned objects and the Panda's links), so
two cameras are ~95% of a step at 56 px. :func:`simplify_render_meshes` rewrites the face lists of the meshes
that only render (geoms with ``contype == conaffinity == 0``, and no colliding geom shares the mesh) by
vertex clustering: vertices in the same cube of side ``cell`` merge into one of them, and triangles left
with fewer than three distinct corners, or repeating another, are dropped. Vertex, normal and texture arrays
stay as they are; only ``mesh_face*`` and ``mesh_facenum`` change, so contacts, inertia and every physics
quantity are those of the full model (a test checks the states stay bit-identical).

Textured meshes (LIBERO's scanned objects, whose texture atlases are cut into many small islands) use a
finer cell and keep each surviving corner's own texture coordinate, so labels stay readable; untextured
meshes (the robot) use a coarser cell. On libero_object this draws ~88k of ~308k triangles: renders ~3x
faster, mean absolute pixel difference ~1-1.5 of 255 at 256 px (``benchmarks/render_lod.py``).
"""

from __future__ import annotations

import hashlib

import numpy as np

UNTEXTURED_CELL = 0.008
"""Cluster size (m) of meshes without a texture: flat-coloured robot links, whose detail is far below a pixel."""
TEXTURED_CELL = 0.003
"""Cluster size (m) of textured meshes: small enough that the texture on the merged triangles stays legible."""

_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
"""(mesh checksum, cell) -> (kept face rows, their new corner vertices): envs rebuild their model at every
hard reset, and the same meshes come back."""


def cluster_faces(vert: np.ndarray, face: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering of one triangle mesh.

    ``vert`` (V, 3) positions, ``face`` (F, 3) vertex indices, ``cell`` the cube side. Returns ``(rows, new)``:
    the indices of the faces kept (ascending) and their (K, 3) corners, each replaced by the first vertex
    of its cube. A face is dropped when two corners share a cube or when an earlier kept face has the same
    three cubes."""
    if cell <= 0:
        raise ValueError(f"cell must be > 0, got {cell}")
    vert, face = np.asarray(vert), np.asarray(face, dtype=np.int64)
    if vert.ndim != 2 or vert.shape[1] != 3 or face.ndim != 2 or face.shape[1] != 3:
        raise ValueError(f"expected vert (V, 3) and face (F, 3), got {vert.shape} and {face.shape}")
    if len(face) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    q = np.floor(vert / cell).astype(np.int64)
    q -= q.min(axis=0)
    span = q.max(axis=0) + 1
    key = (q[:, 0] * span[1] + q[:, 1]) * span[2] + q[:, 2]  # one integer per cube: 1-D unique is fast
    _, first, cube = np.unique(key, return_index=True, return_inverse=True)
    c = cube.reshape(-1)[face]
    distinct = (c[:, 0] != c[:, 1]) & (c[:, 1] != c[:, 2]) & (c[:, 0] != c[:, 2])
    cand = np.flatnonzero(distinct)
    triple = np.sort(c[cand], axis=1)
    _, once = np.unique(triple, axis=0, return_index=True)
    rows = cand[np.sort(once)]
    return rows, first[c[rows]]


def _textured(model, geom: int) -> bool:
    mat = int(model.geom_matid[geom])
    return mat >= 0 and bool((np.atleast_1d(model.mat_texid[mat]) >= 0).any())


def simplify_render_meshes(model, untextured_cell: float = UNTEXTURED_CELL,
                           textured_cell: float = TEXTURED_CELL) -> tuple[int, int]:
    """Simplify, in place, every render-only mesh of a compiled ``mujoco.MjModel``; returns the triangles of
    those meshes before and after. Call it once per model, before the render context uploads the meshes (or
    rebuild the context afterwards): the face arrays are overwritten, so a second call simplifies again."""
    import mujoco

    mesh_geoms: dict[int, list[int]] = {}
    for g in range(model.ngeom):
        if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH and model.geom_dataid[g] >= 0:
            mesh_geoms.setdefault(int(model.geom_dataid[g]), []).append(g)
    before = after = 0
    for mesh, geoms in mesh_geoms.items():
        if any(model.geom_contype[g] or model.geom_conaffinity[g] for g in geoms):
            continue  # a colliding geom uses this mesh: its faces stay exact
        textured = any(_textured(model, g) for g in geoms)
        cell = textured_cell if textured else untextured_cell
        fa, fn = int(model.mesh_faceadr[mesh]), int(model.mesh_facenum[mesh])
        va, vn = int(model.mesh_vertadr[mesh]), int(model.mesh_vertnum[mesh])
        vert, face = model.mesh_vert[va:va + vn], model.mesh_face[fa:fa + fn]
        key = (hashlib.blake2b(vert.tobytes() + face.tobytes(), digest_size=16).digest(), cell)
        if key not in _CACHE:
            _CACHE[key] = cluster_faces(vert, face, cell)
        rows, new = _CACHE[key]
        k = len(rows)
        # Normals and texture coordinates are indexed per face corner: the kept faces keep their own (a
        # merged vertex's normal or texture coordinate could come from another texture island).
        model.mesh_facenormal[fa:fa + k] = model.mesh_facenormal[fa:fa + fn][rows]
        if model.mesh_texcoordadr[mesh] >= 0:
            model.mesh_facetexcoord[fa:fa + k] = model.mesh_facetexcoord[fa:fa + fn][rows]
        model.mesh_face[fa:fa + k] = new
        model.mesh_facenum[mesh] = k
        before, after = before + fn, after + k
    return before, after
