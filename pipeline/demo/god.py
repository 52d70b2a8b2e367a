"""A miniature GOD look-alike: BData ``Subject{n}.h5`` files, synthetic stimulus images named by
stimulus id, and a planted category code, for tests and a DVC stage without the real data.

Same layout as the release (:mod:`.god`): ``/dataset`` + ``/metadata/{key,description,value}``
written with h5py exactly as bdpy's ``BData.save`` writes them (keys and descriptions as byte
strings, values keys x columns, NaN where a key does not apply), the real GOD synset ids and class
names (the first ``n_train_classes`` / ``n_test_classes`` of ``god_classes.tsv``), stimulus labels
encoded as synset + index / 1e6, ``DataType`` 1/2/3, runs, ROI keys ``ROI_V1`` .. ``ROI_VC`` (plus
voxels outside VC that carry no signal).

Planted signal: each category c has a latent ``z_c`` (``latent_dim``); each image i of it a latent
``u_i = z_c + image_spread * noise``. The shared embedding space is ``A @ latent`` (``embed_dim``):
``class_embeds`` (A z_c) stand in for CLIP text embeddings of the class names and ``image_embeds``
(A u_i) for CLIP image embeddings. A perception trial of image i is ``W @ u_i`` plus trial noise, an
imagery trial ``imagery_gain * W @ z_c`` plus noise, then a per-run gain and offset per voxel (so
normalisation matters). Held-out (test) categories share A and W with the training ones, so a decoder
fitted on training images recovers them through the shared embedding. ``planted.npz`` keeps the
truth: ``class_synsets``, ``class_embeds``, ``image_ids``, ``image_embeds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..store import atomic_dir
from ..data.god import CLASS_TABLE, ROIS, SPLITS, load_class_table

ROI_VOXELS = {"V1": 12, "V2": 10, "V3": 10, "V4": 8, "LOC": 8, "FFA": 6, "PPA": 6}
"""Voxels per primary ROI; LVC = V1-V3, HVC = LOC + FFA + PPA, VC = all seven (as in the release)."""
COMPOSITE = {"LVC": ("V1", "V2", "V3"), "HVC": ("LOC", "FFA", "PPA"), "VC": tuple(ROI_VOXELS)}


@dataclass(frozen=True)
class GODDemoConfig:
    """Sizes and noise of the look-alike (defaults: seconds to write, enough trials to decode)."""

    subjects: tuple[int, ...] = (1,)
    n_train_classes: int = 40
    images_per_class: int = 3
    n_test_classes: int = 20
    test_reps: int = 4
    imagery_reps: int = 2
    train_runs: int = 4
    outside_voxels: int = 10
    latent_dim: int = 12
    embed_dim: int = 32
    image_spread: float = 0.3
    imagery_gain: float = 0.5
    noise: float = 1.5
    image_size: int = 32
    label_key: str = "stimulus_id"
    seed: int = 0


def _stimuli(synsets: list[str], per_class: int, rng: np.random.Generator) -> list[str]:
    """``per_class`` stimulus ids per synset, with distinct random image indices."""
    return [f"{s}_{i}" for s in synsets for i in sorted(rng.choice(np.arange(1, 60000), per_class, replace=False))]


def _label(stimulus: str) -> float:
    synset, _, index = stimulus.partition("_")
    return int(synset[1:]) + (int(index) / 1e6 if index else 0.0)


def _write_image(path: Path, latent: np.ndarray, size: int) -> None:
    """A small JPEG whose colours and stripe frequency follow the image's latent (deterministic)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = 1 / (1 + np.exp(-latent[:3]))
    freq = 2 + 4 / (1 + np.exp(-latent[3]))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + yy * np.tanh(latent[4])))
    img = (255 * stripes[..., None] * rgb).astype(np.uint8)
    Image.fromarray(img).save(path, format="JPEG", quality=95)


def _write_bdata(path: Path, x: np.ndarray, meta: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write a BData HDF5 file the way bdpy's ``BData.save`` does."""
    with h5py.File(path, "w") as f:
        f.create_dataset("/dataset", data=x)
        f.create_group("/metadata")
        f.create_dataset("/metadata/key", data=[k.encode() for k in meta])
        f.create_dataset("/metadata/description", data=[d.encode() for d, _ in meta.values()])
        f.create_dataset("/metadata/value", data=np.stack([v for _, v in meta.values()]))
        f.create_group("/vmap")


def _subject(cfg: GODDemoConfig, subject: int, trials: list[tuple[int, int, str, np.ndarray]],
             rng: np.random.Generator) -> tuple[np.ndarray, dict[str, tuple[str, np.ndarray]]]:
    """One subject's (samples, columns) matrix and metadata for ``trials`` (DataType, run, stimulus, latent)."""
    names = [r for r, n in ROI_VOXELS.items() for _ in range(n)] + [""] * cfg.outside_voxels
    n_vox = len(names)
    w = rng.standard_normal((n_vox, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)
    w[len(names) - cfg.outside_voxels:] = 0  # outside VC: noise only
    runs = sorted({(t[0], t[1]) for t in trials})
    gain = {r: rng.uniform(0.7, 1.3, n_vox) for r in runs}
    offset = {r: rng.normal(0, 1.0, n_vox) + 5 for r in runs}
    betas = np.stack([gain[(k, r)] * (w @ u + cfg.noise * rng.standard_normal(n_vox)) + offset[(k, r)]
                      for k, r, _, u in trials])
    n_cols = n_vox + 3
    x = np.column_stack([betas, [t[0] for t in trials], [t[1] for t in trials], [_label(t[2]) for t in trials]])

    def on(cols: slice | int, value: np.ndarray | float = 1.0) -> np.ndarray:
        row = np.full(n_cols, np.nan)
        row[cols] = value
        return row

    vox = slice(0, n_vox)
    meta = {"VoxelData": ("1 = VoxelData", on(vox))}
    grid = rng.permutation(np.arange(n_vox * 4))[:n_vox]
    for axis, coord in zip("xyz", (grid % 8, (grid // 8) % 8, grid // 64)):
        meta[f"voxel_{axis}"] = (f"Voxel {axis} coordinate", on(vox, coord.astype(float)))
    member = {r: np.array([n == r for n in names], float) for r in ROI_VOXELS}
    member.update({c: np.logical_or.reduce([member[p] > 0 for p in parts]).astype(float) for c, parts in COMPOSITE.items()})
    for roi in ROIS:
        meta[f"ROI_{roi}"] = (f"1 = ROI {roi}", on(vox, member[roi]))
    meta["DataType"] = ("1 = DataType: 1 training, 2 test perception, 3 test imagery", on(n_vox))
    meta["Run"] = ("1 = Run", on(n_vox + 1))
    meta[cfg.label_key] = (f"1 = {cfg.label_key}", on(n_vox + 2))
    return x, meta


def make_god_demo(out: Path, cfg: GODDemoConfig = GODDemoConfig()) -> Path:
    """Write the look-alike to ``out`` (atomically): ``fmri/Subject{n}.h5``, ``images/<id>.JPEG``, ``planted.npz``."""
    rng = np.random.default_rng(cfg.seed)
    table = load_class_table(CLASS_TABLE)
    train_syn = [s for s, (split, _) in table.items() if split == "train"][: cfg.n_train_classes]
    test_syn = [s for s, (split, _) in table.items() if split == "test"][: cfg.n_test_classes]
    synsets = train_syn + test_syn
    z = dict(zip(synsets, rng.standard_normal((len(synsets), cfg.latent_dim))))
    train_ids = _stimuli(train_syn, cfg.images_per_class, rng)
    test_ids = _stimuli(test_syn, 1, rng)
    u = {s: z[s.split("_")[0]] + cfg.image_spread * rng.standard_normal(cfg.latent_dim) for s in train_ids + test_ids}
    a = rng.standard_normal((cfg.embed_dim, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)
    with atomic_dir(Path(out)) as tmp:
        (tmp / "fmri").mkdir()
        (tmp / "images").mkdir()
        for s in train_ids + test_ids:
            _write_image(tmp / "images" / f"{s}.JPEG", u[s], cfg.image_size)
        run_of = {s: 1 + i % cfg.train_runs for i, s in enumerate(rng.permutation(train_ids))}
        trials = [(SPLITS["train"], run_of[s], s, u[s]) for s in train_ids]
        run = cfg.train_runs
        for _ in range(cfg.test_reps):
            run += 1
            trials += [(SPLITS["test"], run, s, u[s]) for s in rng.permutation(test_ids)]
        for _ in range(cfg.imagery_reps):
            run += 1
            trials += [(SPLITS["imagery"], run, s, cfg.imagery_gain * z[s]) for s in rng.permutation(test_syn)]
        for subject in cfg.subjects:
            x, meta = _subject(cfg, subject, trials, np.random.default_rng([cfg.seed, subject]))
            _write_bdata(tmp / "fmri" / f"Subject{subject}.h5", x, meta)
        image_ids = train_ids + test_ids
        np.savez(tmp / "planted.npz", class_synsets=np.array(synsets), class_embeds=np.stack([a @ z[s] for s in synsets]),
                 image_ids=np.array(image_ids), image_embeds=np.stack([a @ u[s] for s in image_ids]))
    return Path(out)
