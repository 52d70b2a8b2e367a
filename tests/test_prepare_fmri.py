"""prepare-fmri against a from-scratch numpy/pandas computation on the raw demo files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.data.fmri import prepare_fmri, zscore_session
from pipeline.data.nsd import NSD
from pipeline.demo.nsd import DemoConfig

ROOT = Path(__file__).resolve().parents[1]


def reference(root: Path, subject: int, zscore: bool = True) -> pd.DataFrame:
    """Trials x voxels of a subject, computed directly from the HDF5 files and the CSV rep columns."""
    nsd = NSD(root)
    general = nsd.read_roi(subject, "nsdgeneral")
    ijk = np.argwhere(general == 1)
    sessions = []
    for s in nsd.sessions(subject):
        with h5py.File(nsd.betas_path(subject, s, "hdf5")) as f:
            vol = f["betas"][()].transpose(0, 3, 2, 1)  # (T, X, Y, Z)
        b = vol[:, ijk[:, 0], ijk[:, 1], ijk[:, 2]].astype(np.float64) / 300
        if zscore:
            sd = b.std(0)
            b = np.where(sd > 0, (b - b.mean(0)) / np.where(sd > 0, sd, 1), 0.0)
        sessions.append(b)
    betas = np.concatenate(sessions)
    info = nsd.stim_info
    image = np.full(len(betas), -1)
    for rep in range(3):
        col = info[f"subject{subject}_rep{rep}"].to_numpy()
        image[col[col > 0] - 1] = info.index[col > 0]
    df = pd.DataFrame(betas)
    df["image"] = image
    df["test"] = info["shared1000"].to_numpy()[image]
    return df


@pytest.fixture(scope="module")
def subj01(demo_fmri) -> zarr.Group:
    return zarr.open_group(demo_fmri(), mode="r")


def test_repeat_averaging_split_and_zscore_match_reference(demo_root, subj01):
    ref = reference(demo_root, 1)
    for split, is_test in (("train", False), ("test", True)):
        part = ref[ref["test"] == is_test].drop(columns="test")
        mean = part.groupby("image").mean().sort_index()
        np.testing.assert_array_equal(subj01[f"{split}/image_ids"][:], mean.index.to_numpy())
        np.testing.assert_allclose(subj01[f"{split}/betas"][:], mean.to_numpy(), atol=2e-5)
        np.testing.assert_array_equal(subj01[f"{split}/n_repeats"][:], part.groupby("image").size().sort_index())
    assert subj01["train/betas"].dtype == np.float32 and subj01["train/image_ids"].dtype == np.int64


def test_voxel_order_rois_and_attrs(demo_root, subj01):
    nsd = NSD(demo_root)
    general = nsd.read_roi(1, "nsdgeneral")
    ijk = np.argwhere(general == 1)  # C order over (X, Y, Z)
    np.testing.assert_array_equal(subj01["voxels/ijk"][:], ijk)
    prf = nsd.read_roi(1, "prf-visualrois")[tuple(ijk.T)]
    np.testing.assert_array_equal(subj01["voxels/prf-visualrois"][:], np.maximum(prf, 0))
    assert subj01["voxels/prf-visualrois"].attrs["labels"]["7"] == "hV4"
    attrs = dict(subj01.attrs)
    n = DemoConfig().sessions[0]
    assert attrs["subject"] == 1 and attrs["sessions"] == list(range(1, n + 1)) and attrs["zscore"] == "session"
    assert attrs["repeats"] == "mean" and len(attrs["sources"]["betas"]) == n and attrs["train_sessions"] == attrs["sessions"]


def test_invalid_voxels_are_zero_and_counted(demo_root, subj01):
    ref = reference(demo_root, 1, zscore=False)
    per_session = np.split(ref.drop(columns=["image", "test"]).to_numpy(), DemoConfig().sessions[0])
    expected = sum((s == 0).all(0).astype(int) for s in per_session)
    assert expected.max() >= 1  # the demo plants some
    np.testing.assert_array_equal(subj01["voxels/invalid_sessions"][:], expected)
    assert np.isfinite(subj01["train/betas"][:]).all()


def test_zscore_session_is_population_and_finite():
    rng = np.random.default_rng(0)
    b = rng.normal(3, 2, (50, 4)).astype(np.float32)
    b[:, 1] = 0  # invalid voxel
    b[:, 2] = 5  # constant voxel
    z, invalid = zscore_session(b)
    np.testing.assert_array_equal(invalid, [False, True, False, False])
    np.testing.assert_allclose(z[:, [0, 3]].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z[:, [0, 3]].std(0), 1, atol=1e-5)  # ddof=0
    assert (z[:, 1:3] == 0).all()


def test_no_averaging_keeps_trials_in_chronological_order(demo_root, tmp_path):
    out = prepare_fmri(demo_root, 2, tmp_path / "s2.zarr", repeats="trials", zscore="none", progress=False)
    g = zarr.open_group(out, mode="r")
    ref = reference(demo_root, 2, zscore=False)
    for split, is_test in (("train", False), ("test", True)):
        trials = np.flatnonzero(ref["test"].to_numpy() == is_test)
        np.testing.assert_array_equal(g[f"{split}/trial_ids"][:], trials)
        np.testing.assert_array_equal(g[f"{split}/image_ids"][:], ref["image"].to_numpy()[trials])
        np.testing.assert_allclose(
            g[f"{split}/betas"][:], ref.drop(columns=["image", "test"]).to_numpy()[trials], atol=1e-6
        )


def test_train_trials_store_matches_reference(demo_root, demo_fmri):
    """Train rows per trial (chronological), test rows per image (mean of its trials, sorted by id)."""
    g = zarr.open_group(demo_fmri(repeats="train-trials"), mode="r")
    ref = reference(demo_root, 1)
    betas = ref.drop(columns=["image", "test"]).to_numpy()
    trials = np.flatnonzero(~ref["test"].to_numpy())
    np.testing.assert_array_equal(g["train/trial_ids"][:], trials)
    np.testing.assert_array_equal(g["train/image_ids"][:], ref["image"].to_numpy()[trials])
    np.testing.assert_allclose(g["train/betas"][:], betas[trials], atol=2e-5)
    assert "train/n_repeats" not in g and "test/trial_ids" not in g
    test = ref[ref["test"]].drop(columns="test")
    mean = test.groupby("image").mean().sort_index()
    np.testing.assert_array_equal(g["test/image_ids"][:], mean.index.to_numpy())
    np.testing.assert_allclose(g["test/betas"][:], mean.to_numpy(), atol=2e-5)
    np.testing.assert_array_equal(g["test/n_repeats"][:], test.groupby("image").size().sort_index())
    assert g.attrs["repeats"] == "train-trials"


def test_repeats_option_and_its_aliases(demo_root, tmp_path):
    for args, mode in ((["--repeats", "train-trials"], "train-trials"), (["--no-average-repeats"], "trials"),
                       (["--average-repeats"], "mean")):
        out = tmp_path / f"{mode}.zarr"
        result = CliRunner().invoke(app, ["prepare-fmri", "--nsd-root", str(demo_root), "--subject", "2",
                                          "--sessions", "1", *args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert zarr.open_group(out, mode="r").attrs["repeats"] == mode
    _fails(["--nsd-root", str(demo_root), "--subject", "2", "--repeats", "median"], "--repeats must be one of", tmp_path / "o.zarr")
    _fails(["--nsd-root", str(demo_root), "--subject", "2", "--repeats", "mean", "--no-average-repeats"], "contradicts", tmp_path / "o.zarr")


def test_nifti_and_hdf5_give_identical_stores(demo_root, tmp_path):
    a = zarr.open_group(prepare_fmri(demo_root, 1, tmp_path / "a.zarr", beta_format="nifti", sessions=2, progress=False))
    b = zarr.open_group(prepare_fmri(demo_root, 1, tmp_path / "b.zarr", beta_format="hdf5", sessions=2, progress=False))
    for name in ("train/betas", "train/image_ids", "test/betas", "voxels/invalid_sessions"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a.attrs["sessions"] == [1, 2]


# ---- bad input: one line, exit 1, nothing left behind -------------------------------------------------
def _copy(demo_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "nsd"
    shutil.copytree(demo_root, dst, ignore=shutil.ignore_patterns("demo", "nsd_stimuli.hdf5"))
    return dst


def _fails(args: list[str], match: str, out: Path) -> None:
    result = CliRunner().invoke(app, ["prepare-fmri", *args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "sessions:" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.output
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.tmp-*"))


def test_bad_root_subject_and_sessions(demo_root, tmp_path):
    out = tmp_path / "o.zarr"
    _fails(["--nsd-root", str(tmp_path / "missing"), "--subject", "1"], "NSD root not found", out)
    _fails(["--nsd-root", str(demo_root), "--subject", "9"], "subject 9", out)
    _fails(["--nsd-root", str(demo_root), "--subject", "2", "--sessions", "4"], "sessions 1..3", out)
    _fails(["--nsd-root", str(demo_root), "--subject", "2", "--train-sessions", "4"], "--train-sessions 4: choose 1..3", out)
    _fails(["--nsd-root", str(demo_root), "--subject", "1", "--zscore", "run"], "--zscore", out)


def test_missing_file_and_corrupt_hdf5(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path)
    out = tmp_path / "o.zarr"
    (root / "nsddata/experiments/nsd/nsd_expdesign.mat").unlink()
    _fails(["--nsd-root", str(root), "--subject", "2"], "nsd_expdesign.mat", out)
    shutil.copy(demo_root / "nsddata/experiments/nsd/nsd_expdesign.mat", root / "nsddata/experiments/nsd/")
    beta = NSD(root).betas_path(2, 2, "hdf5")
    beta.write_bytes(b"not an hdf5 file" * 100)
    _fails(["--nsd-root", str(root), "--subject", "2"], "betas_session02.hdf5: not a readable HDF5", out)


def test_beta_volume_shape_mismatch(demo_root, tmp_path):
    root = _copy(demo_root, tmp_path)
    beta = NSD(root).betas_path(2, 1, "hdf5")
    with h5py.File(beta, "r+") as f:
        data = f["betas"][()]
        del f["betas"]
        f["betas"] = data[:, :, :, :-1]
    _fails(["--nsd-root", str(root), "--subject", "2"], "betas_session01.hdf5: /betas volume", tmp_path / "o.zarr")


def test_cli_help_and_real_process_exit_code(demo_root, tmp_path):
    helptext = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for command in ("make-demo", "prepare-fmri"):
        assert command in helptext.stdout
    run = subprocess.run(
        [sys.executable, "cli.py", "prepare-fmri", "--nsd-root", str(demo_root), "--subject", "3",
         "--out", str(tmp_path / "x.zarr")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr  # the demo writes subjects 1, 2, 5, 7
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "subject 3" in run.stderr
