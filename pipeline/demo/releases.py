"""Look-alikes of the MindEye2, MindEye1 and Brain-Diffuser releases, derived from a raw NSD tree
(the demo's, :mod:`pipeline.demo.nsd`) the way those releases derive from NSD: the same file names,
keys, columns, dtypes and normalisation, at the raw tree's sizes.

Two miniature conventions stand in for NSD's numbers: the "older" era (37 of 40 sessions in NSD) is
the first ``int(n * 37 / 40)`` sessions (at least 1) of each subject, and MindEye2's 224-px images are
written at ``image_size`` (the demo model's input size, as 224 is ViT-L/14's).
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..data.nsd import BETA_SCALE, NSD, NSDLayout
from ..data.releases import brain_diffuser, mindeye2

OLD_SESSIONS = 37 / 40


def old_sessions(n: int) -> int:
    """Sessions of the older test era for a subject with ``n`` sessions (37 of NSD's 40)."""
    return max(1, int(n * OLD_SESSIONS))


def _subject_psc(nsd: NSD, subject: int, n_sessions: int) -> tuple[np.ndarray, list[int]]:
    """(trials, nsdgeneral voxels) float32 percent signal change of sessions 1..n, and trials per session."""
    mask = nsd.read_roi(subject, "nsdgeneral") == 1
    blocks = [nsd.read_betas(subject, s, mask) for s in range(1, n_sessions + 1)]
    return np.concatenate(blocks), [len(b) for b in blocks]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _subjects(nsd: NSD, subjects: tuple[int, ...] | None) -> list[int]:
    found = sorted(int(p.name[4:]) for p in (nsd.root / "nsddata_betas/ppdata").glob("subj[0-9][0-9]"))
    return list(subjects) if subjects else found


def make_mindeye2(nsd_root: Path | str, out: Path | str, subjects: tuple[int, ...] | None = None,
                  image_size: int = 32) -> Path:
    """MindEye2's files: per subject ``betas_all_subjXX_fp32_renorm.hdf5`` (all sessions, z-scored per
    voxel with the training trials' mean and population std) and ``wds/subjXX/{train/<session-1>,
    test/0, new_test/0}.tar`` (``behav.npy`` (1, 17)); ``coco_images_224_float16.hdf5``,
    ``shared1000.npy`` and ``COCO_73k_subj_indices.hdf5``."""
    nsd, out = NSD(nsd_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with nsd.stimuli() as brick:
        images = _resize(brick[()], image_size)
    with h5py.File(out / "coco_images_224_float16.hdf5", "w") as f:
        f.create_dataset("images", data=(images.transpose(0, 3, 1, 2) / 255.0).astype(np.float16))
    shared = np.zeros(len(images), bool)
    shared[nsd.expdesign.sharedix - 1] = True
    np.save(out / "shared1000.npy", shared)
    indices = {}
    for s in _subjects(nsd, subjects):
        psc, per_session = _subject_psc(nsd, s, len(nsd.sessions(s)))
        ids, is_test = nsd.expdesign.trials(s, len(psc))
        train = psc[~is_test].astype(np.float64)
        mean, std = train.mean(0), train.std(0)
        z = np.where(std > 0, (psc - mean) / np.where(std > 0, std, 1), 0).astype(np.float32)
        with h5py.File(mindeye2.betas_path(out, s), "w") as f:
            f.create_dataset("betas", data=z)
        indices[f"subj{s:02d}"] = ids
        session = np.repeat(np.arange(1, len(per_session) + 1), per_session)
        behav = np.full((len(psc), mindeye2.BEHAV_COLUMNS), -1, np.int64)
        behav[:, mindeye2.COL_ID], behav[:, 1], behav[:, mindeye2.COL_SESSION] = ids, s, session
        behav[:, mindeye2.COL_TRIAL], behav[:, mindeye2.COL_SHARED] = np.arange(len(psc)), is_test

        def samples(sel: np.ndarray) -> list[tuple[str, dict[str, bytes]]]:
            return [(f"sample{t:06d}", {"behav.npy": _npy(behav[t : t + 1])}) for t in np.flatnonzero(sel)]

        wds = mindeye2.wds_dir(out, s)
        for k in range(len(per_session)):
            _write_tar(wds / f"train/{k}.tar", samples(~is_test & (session == k + 1)))
        _write_tar(wds / "new_test/0.tar", samples(is_test))
        _write_tar(wds / "test/0.tar", samples(is_test & (session <= old_sessions(len(per_session)))))
    with h5py.File(out / "COCO_73k_subj_indices.hdf5", "w") as f:
        for key, ids in indices.items():
            f.create_dataset(key, data=ids)
    return out


def make_mindeye1(nsd_root: Path | str, out: Path | str, subjects: tuple[int, ...] | None = None,
                  seed: int = 0) -> Path:
    """MindEye1's ``webdataset_avg_split``: the older-era sessions, z-scored per session (population
    std); one sample per image with its repetitions padded to three rows (1 -> [a, a, a],
    2 -> [a, b, mean]) and ``num_uniques``; about 10% of the training images in ``val``; shuffled."""
    nsd, out = NSD(nsd_root), Path(out)
    rng = np.random.default_rng(seed)
    with nsd.stimuli() as brick:
        images = brick[()]
    for s in _subjects(nsd, subjects):
        mask = nsd.read_roi(s, "nsdgeneral") == 1
        blocks = []
        for session in range(1, old_sessions(len(nsd.sessions(s))) + 1):
            b = nsd.read_betas(s, session, mask).astype(np.float64)
            mean, std = b.mean(0), b.std(0)
            blocks.append(np.where(std > 0, (b - mean) / np.where(std > 0, std, 1), 0).astype(np.float32))
        z = np.concatenate(blocks)
        ids, is_test = nsd.expdesign.trials(s, len(z))
        by_split: dict[str, list] = {"train": [], "val": [], "test": []}
        for image in np.unique(ids):
            trials = np.flatnonzero(ids == image)
            reps, n_real = z[trials], len(trials)
            if len(trials) == 1:
                reps, trials = np.repeat(reps, 3, 0), np.repeat(trials, 3)
            elif len(trials) == 2:
                reps, trials = np.vstack([reps, reps.mean(0)]), np.r_[trials, trials[-1]]
            split = "test" if is_test[trials[0]] else ("val" if rng.random() < 0.1 else "train")
            jpg = io.BytesIO()
            Image.fromarray(images[image]).resize((256, 256), Image.BICUBIC).save(jpg, "JPEG", quality=95)
            by_split[split].append({"nsdgeneral.npy": _npy(reps.astype(np.float32)), "jpg": jpg.getvalue(),
                                    "coco73k.npy": _npy(np.array(image)), "trial.npy": _npy(trials),
                                    "num_uniques.npy": _npy(np.array(n_real))})
        for split, samples in by_split.items():
            order = rng.permutation(len(samples))
            n_tars = 3 if split == "train" else (2 if split == "test" else 1)
            for k, part in enumerate(np.array_split(order, n_tars)):
                _write_tar(out / split / f"{split}_subj{s:02d}_{k}.tar",
                           [(f"sample{n:05d}", samples[n]) for n in part])
    return out


def make_brain_diffuser(nsd_root: Path | str, out: Path | str, subjects: tuple[int, ...] | None = None) -> Path:
    """Brain-Diffuser's ``data/``: ``nsddata/experiments/nsd/nsd_expdesign.mat`` as downloaded, and per
    subject its recipe over the older-era sessions: betas x 300 (float32 trials, their mean stored in
    float64 arrays) averaged per image in order of first appearance, stimuli float64 at their native
    size, five captions per image."""
    nsd, out = NSD(nsd_root), Path(out)
    design = NSDLayout(out).expdesign_path
    design.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(nsd.expdesign_path, design)
    with nsd.stimuli() as brick:
        images = brick[()]
    for s in _subjects(nsd, subjects):
        psc, _ = _subject_psc(nsd, s, old_sessions(len(nsd.sessions(s))))
        raw = np.rint(psc * BETA_SCALE).astype(np.float32)  # nib get_fdata().astype(float32) of the int16 file
        ids, is_test = nsd.expdesign.trials(s, len(psc))
        for split, sel in (("train", ~is_test), ("test", is_test)):
            order: dict[int, list[int]] = {}
            for t in np.flatnonzero(sel):
                order.setdefault(int(ids[t]), []).append(int(t))
            keys = list(order)
            folder = brain_diffuser.array_path(out, s, split, "stim").parent
            folder.mkdir(parents=True, exist_ok=True)
            fmri = np.zeros((len(keys), raw.shape[1]))  # float64, as its np.zeros buffer
            fmri[:] = [raw[order[k]].mean(0) for k in keys]
            np.save(brain_diffuser.array_path(out, s, split, "fmriavg_nsdgeneral"), fmri)
            stim = np.zeros((len(keys), *images.shape[1:]))
            stim[:] = images[keys]
            np.save(brain_diffuser.array_path(out, s, split, "stim"), stim)
            np.save(brain_diffuser.array_path(out, s, split, "cap"), nsd.captions(keys))
    return out

