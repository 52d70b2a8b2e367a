"""The look-alike keeps NSD's formats and carries the planted, hierarchical signal it promises."""

from __future__ import annotations

import h5py
import numpy as np
import scipy.io
import zarr

from pipeline.data.nsd import NSD
from pipeline.demo.nsd import DemoConfig, make_demo
from pipeline.demo.tower import TowerTraining


def test_formats_dtypes_and_index_bases(demo_root):
    mat = scipy.io.loadmat(demo_root / "nsddata/experiments/nsd/nsd_expdesign.mat")
    mo = mat["masterordering"]
    assert mo.shape[0] == 1 and mo.dtype == np.float64 and mo.min() == 1
    assert (np.bincount(mo.ravel().astype(int))[1:] == 3).all()  # every 10k index 3 times
    assert (mat["subjectim"][:, : mat["sharedix"].size] == mat["sharedix"]).all()
    nsd = NSD(demo_root)
    with h5py.File(nsd.betas_path(2, 1, "hdf5")) as f:
        assert f["betas"].dtype == np.int16 and f["betas"].shape[1:] == (12, 16, 13)  # (T, Z, Y, X); subj02 is 13x16x12
    assert not nsd.betas_path(2, 1, "nifti").exists() and nsd.betas_path(1, 1, "nifti").exists()
    assert list(nsd.stim_info.columns[:8]) == ["cocoId", "cocoSplit", "cropBox", "loss", "nsdId",
                                                "flagged", "BOLD5000", "shared1000"]
    assert nsd.stim_info.shape[1] == 16 + 24


def _repeat_reliability(store: zarr.Group) -> np.ndarray:
    """Per-voxel correlation, over images, between an image's first and second trial."""
    ids, betas = store["train/image_ids"][:], store["train/betas"][:]
    first, second = {}, {}
    for row, img in enumerate(ids):
        (second if img in first else first).setdefault(img, row)
    both = sorted(second)
    a, b = betas[[first[i] for i in both]], betas[[second[i] for i in both]]
    a, b = (a - a.mean(0)) / a.std(0), (b - b.mean(0)) / b.std(0)
    return (a * b).mean(0)


def test_planted_voxels_are_reliable_and_others_are_noise(demo_root, demo_fmri):
    store = zarr.open_group(demo_fmri(repeats="trials"), mode="r")
    r = _repeat_reliability(store)
    prf = store["voxels/prf-visualrois"][:] > 0
    floc = np.any([store[f"voxels/floc-{n}"][:] > 0 for n in ("faces", "bodies", "places", "words")], axis=0)
    noise = np.load(demo_root / "demo/planted.npz")["noise"]
    ceiling = 1 / (1 + noise**2)  # correlation of two single trials with unit-variance signal
    assert abs(np.nanmean(r[prf]) - ceiling) < 0.1
    assert abs(np.nanmean(r[floc]) - ceiling) < 0.1
    assert abs(np.nanmean(r[~prf & ~floc])) < 0.05


def test_same_seed_same_data(tmp_path):
    cfg = DemoConfig(n_images=120, subjects=(1,), sessions=(1,), trials_per_session=90, n_shared=10, volume=(8, 9, 7),
                     tower=TowerTraining(epochs=2))  # a short training: still part of what must repeat
    a, b = make_demo(tmp_path / "a", cfg), make_demo(tmp_path / "b", cfg)
    assert (a / "demo/nsd-tiny-vit.safetensors").read_bytes() == (b / "demo/nsd-tiny-vit.safetensors").read_bytes()
    with h5py.File(NSD(a).betas_path(1, 1, "hdf5")) as fa, h5py.File(NSD(b).betas_path(1, 1, "hdf5")) as fb:
        np.testing.assert_array_equal(fa["betas"][()], fb["betas"][()])
    with NSD(a).stimuli() as ia, NSD(b).stimuli() as ib:
        np.testing.assert_array_equal(ia[()], ib[()])


def test_subjects_differ_in_voxels_and_sessions_and_share_one_code(demo_root):
    """Subjects 1, 2, 5, 7 (NSD's numbers), each with its own volume and session count; their planted
    voxels mix the same shared code, so one subject's signal is (nearly) a linear map of another's."""
    cfg = DemoConfig()
    nsd = NSD(demo_root)
    counts = {s: int((nsd.read_roi(s, "nsdgeneral") == 1).sum()) for s in cfg.subjects}
    assert len(set(counts.values())) == len(cfg.subjects)
    assert {s: len(nsd.sessions(s)) for s in cfg.subjects} == dict(zip(cfg.subjects, cfg.sessions))
    mat = scipy.io.loadmat(demo_root / "nsddata/experiments/nsd/nsd_expdesign.mat")
    assert mat["subjectim"].shape[0] == max(cfg.subjects)
    planted = np.load(demo_root / "demo/planted.npz")
    assert planted["subj07_m_final"].shape[0] == cfg.code_dim and "code_final_w" in planted
