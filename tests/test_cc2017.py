"""prepare-video-fmri against a from-scratch numpy/scipy computation of Wen's preprocessing on the
cc2017 look-alike (CIFTI read by nibabel directly, MATLAB-style detrend, ddof=1 z-score, lag window,
repetition averaging, reproducibility t-test and Bonferroni), the planted signal it must recover,
and bad inputs that end in one line."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.stats
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.data.cc2017 import CC2017, Design
from pipeline.data.video_fmri import prepare_video_fmri
from pipeline.demo.video import DEMO_DESIGN, hrf, save_dtseries
from pipeline.errors import UserError

D = DEMO_DESIGN


def cortex_series(path: Path) -> np.ndarray:
    """(volumes, cortical grayordinates) read with nibabel directly: the CORTEX_* surface models."""
    img = nib.load(str(path))
    models = img.header.get_axis(1)
    cols = [np.arange(sl.start, sl.stop) for name, sl, _ in models.iter_structures()
            if name in ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")]
    return np.asarray(img.dataobj, np.float64)[:, np.concatenate(cols)]


def matlab_preprocess(x: np.ndarray, lag: int) -> np.ndarray:
    """movie_fmri_data_processing.m: st = 2 | 3 for 245 | 246 volumes (scaled: the 25 before the last 4),
    amri_sig_detrend(., 4) with normalised monomials (1:nt).^k, bsxfun z-score with std(., [], 2)."""
    first = len(x) - D.trs_per_segment - D.trailing_volumes
    data = x[first + lag : first + lag + D.trs_per_segment]
    nt = len(data)
    poly = np.stack([np.arange(1, nt + 1, dtype=np.float64) ** k for k in range(5)], 1)
    poly /= np.linalg.norm(poly, axis=0)
    centred = data - data.mean(0)
    coef, *_ = np.linalg.lstsq(poly, centred, rcond=None)
    out = centred - poly @ coef
    return (out - out.mean(0)) / out.std(0, ddof=1)


@pytest.fixture(scope="module")
def store(video_caches) -> zarr.Group:
    return zarr.open_group(video_caches["fmri"], mode="r")


def test_reader_keeps_the_cortical_surface_grayordinates(video_root):
    cc = CC2017(video_root, D)
    seg = D.segments[0]
    run = cc.read_run(cc.run_path(1, seg, 1))
    assert run.data.shape == (1 + 25 + 4, 300) and run.n_grayordinates == 316  # 16 subcortical voxels left out
    np.testing.assert_array_equal(run.data, cortex_series(run.path).astype(np.float32))
    assert set(run.cortex.hemisphere) == {1, 2} and run.step == 2.0
    test2 = cc.read_run(cc.run_path(1, D.split("test")[1], 1))
    assert len(test2.data) == 2 + 25 + 4  # test2..: 2 leading volumes, as the real 246-volume runs


def test_store_matches_a_from_scratch_computation(video_root, store):
    cc = CC2017(video_root, D)
    lag = 2
    train, test = D.split("train"), D.split("test")
    reps = {s.name: [matlab_preprocess(cortex_series(cc.run_path(1, s, r)), lag) for r in range(1, s.repeats + 1)]
            for s in D.segments}
    # reproducibility: per segment r of the two repeats -> Fisher z -> one-sided one-sample t-test
    r = np.stack([[np.corrcoef(a[:, v], b[:, v])[0, 1] for v in range(300)] for a, b in (reps[s.name] for s in train)])
    test_res = scipy.stats.ttest_1samp(np.arctanh(r), 0.0, axis=0, alternative="greater")
    np.testing.assert_allclose(store["selection/p_value"][:], test_res.pvalue, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(store["selection/t"][:], test_res.statistic, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store["selection/mean_r"][:], r.mean(0), atol=1e-6)
    selected = test_res.pvalue * 300 < 0.05
    np.testing.assert_array_equal(store["selection/selected"][:], selected)
    idx = np.flatnonzero(selected)
    assert store.attrs["n_selected"] == len(idx) > 0

    # train: one row per run and TR, segment -> repeat -> TR; test: the mean of the 10 repeats
    expected_train = np.concatenate([rep[:, idx] for s in train for rep in reps[s.name]])
    np.testing.assert_allclose(store["train/betas"][:], expected_train, atol=2e-5)
    np.testing.assert_array_equal(store["train/clip_ids"][:], np.concatenate([np.tile(np.arange(25) + 25 * k, 2)
                                                                             for k in range(8)]))
    np.testing.assert_array_equal(store["train/repeat"][:], np.tile(np.repeat([1, 2], 25), 8))
    expected_test = np.concatenate([np.mean(reps[s.name], axis=0)[:, idx] for s in test])
    np.testing.assert_allclose(store["test/betas"][:], expected_test, atol=2e-5)
    np.testing.assert_array_equal(store["test/clip_ids"][:], np.arange(200, 250))
    np.testing.assert_array_equal(store["test/n_repeats"][:], 10)
    models = nib.load(str(cc.run_path(1, train[0], 1))).header.get_axis(1)
    np.testing.assert_array_equal(store["voxels/vertex"][:], models.vertex[store["voxels/grayordinate"][:]])
    assert store.attrs["clip_layout"]["segments"][8] == ["test1", 200, 25] and store.attrs["lag"] == 2


def test_selection_finds_the_planted_voxels(video_root, store):
    planted = np.load(video_root / "demo/planted.npz")
    signal = np.zeros(300, bool)
    signal[planted["subject1_keyframe_voxels"]] = signal[planted["subject1_motion_voxels"]] = True
    selected = store["selection/selected"][:]
    assert not (selected & ~signal).any()  # no noise-only grayordinate passes Bonferroni
    assert (selected & signal).sum() >= 0.5 * signal.sum()


def test_lag_2_aligns_the_planted_hrf(video_root, tmp_path):
    """The demo's HRF peaks at 4 s: the test betas of the keyframe voxels follow their planted drive
    (signal @ weights, before the HRF) best when clip t takes volume t + 2 of the window."""
    planted = np.load(video_root / "demo/planted.npz")
    assert np.argmax(hrf(D.tr)) == 2
    vox = planted["subject1_keyframe_voxels"]
    drive = (planted["keyframe_signal"] @ planted["subject1_w_keyframe"])[200:]  # the 50 test clips
    corr = {}
    for lag in (0, 1, 2, 3):
        g = zarr.open_group(prepare_video_fmri(video_root, 1, tmp_path / f"lag{lag}.zarr", lag=lag, select="all",
                                               design=D, progress=False), mode="r")
        betas = g["test/betas"][:][:, vox]  # select all: columns are the 300 grayordinates in order
        corr[lag] = np.mean([np.corrcoef(betas[:, i], drive[:, i])[0, 1] for i in range(len(vox))])
    assert g["train/betas"].shape == (400, 300) and g.attrs["select"] == "all"
    assert max(corr, key=corr.get) == 2 and corr[2] > 0.5, corr


Case = namedtuple("Case", "edit args message")


def _drop_run(root: Path) -> None:
    (root / "subject1/fmri/seg3/cifti/seg3_2_Atlas.dtseries.nii").unlink()


def _other_grayordinates(root: Path) -> None:
    path = root / "subject1/fmri/test2/cifti/test2_4_Atlas.dtseries.nii"
    img = nib.load(str(path))
    models = img.header.get_axis(1)
    fewer = models[10:]
    save_dtseries(path, np.asarray(img.dataobj)[:, 10:], fewer, 2.0)


def _short_run(root: Path) -> None:
    path = root / "subject1/fmri/seg5/cifti/seg5_1_Atlas.dtseries.nii"
    img = nib.load(str(path))
    save_dtseries(path, np.asarray(img.dataobj)[:20], img.header.get_axis(1), 2.0)


def _garbage(root: Path) -> None:
    (root / "subject1/fmri/seg1/cifti/seg1_1_Atlas.dtseries.nii").write_bytes(b"not a nifti file at all" * 20)


BAD = [
    Case(_drop_run, [], "1 fMRI run(s) missing"),
    Case(_other_grayordinates, [], "test2_4_Atlas.dtseries.nii: 290 cortical grayordinates, expected 300"),
    Case(_short_run, [], "seg5_1_Atlas.dtseries.nii: 20 volumes, but a run needs at least 29"),
    Case(_garbage, [], "seg1_1_Atlas.dtseries.nii: not a readable CIFTI-2 file"),
    Case(None, ["--lag", "5"], "--lag 5: must be an integer in 0..4"),
    Case(None, ["--select", "best"], "--select must be one of reproducible, all"),
    Case(None, ["--subject", "3"], "subject3/fmri not found (subjects here: subject1, subject2)"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.message[:40] for c in BAD])
def test_bad_inputs_fail_with_one_clear_line(video_root, tmp_path, monkeypatch, case):
    root = tmp_path / "cc2017"
    shutil.copytree(video_root / "subject1", root / "subject1")
    (root / "subject2").mkdir()
    if case.edit is not None:
        case.edit(root)
    (tmp_path / "params.yaml").write_text(
        "cc2017_design: {" + ", ".join(f"{k}: {v}" for k, v in D.as_dict().items()) + "}\n")
    monkeypatch.chdir(tmp_path)
    args = ["prepare-video-fmri", "--root", str(root), "--subject", "1", "--out", str(tmp_path / "x.zarr")]
    result = CliRunner().invoke(app, args + case.args)
    assert result.exit_code == 1, result.output
    assert case.message in result.output and result.output.count("\n") == 1, result.output
    shown = [line.rpartition("\r")[2] for line in result.output.split("\n")]  # what a terminal keeps
    assert shown[0].startswith("error: ") and not "".join(shown[1:]).strip(), result.output  # no bar left before it
    assert not (tmp_path / "x.zarr").exists() and not list(tmp_path.glob("x.zarr.tmp-*"))


def test_design_parameters_are_checked():
    with pytest.raises(UserError, match="unknown key 'segments'"):
        Design.from_params({"segments": 3})
    with pytest.raises(UserError, match="trs_per_segment must be an integer >= 1"):
        Design(trs_per_segment=0)
    assert [s.name for s in D.segments][-3:] == ["seg8", "test1", "test2"] and D.n_clips == 250
