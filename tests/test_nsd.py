"""The NSD reader against the look-alike, checked through independent views of the same facts
(the stim-info rep columns, responses.tsv, raw h5py/nibabel reads)."""

from __future__ import annotations

import json

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.data.nsd import NSD, read_ctab
from pipeline.demo.nsd import DemoConfig
from pipeline.errors import UserError


def test_trial_mapping_matches_stim_info_rep_columns(demo_root):
    nsd = NSD(demo_root)
    info = nsd.stim_info
    cfg = DemoConfig()
    for subject, n_sessions in zip(cfg.subjects, cfg.sessions):
        n_trials = n_sessions * nsd.n_trials(subject, 1)
        ids, is_test = nsd.expdesign.trials(subject, n_trials)
        # independent: the CSV lists, per image, the 1-based global trials it was shown in
        expected = np.full(n_trials, -1)
        for rep in range(3):
            col = info[f"subject{subject}_rep{rep}"].to_numpy()
            shown = col > 0
            expected[col[shown] - 1] = info.index.to_numpy()[shown]
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_array_equal(is_test, info["shared1000"].to_numpy()[ids])


def test_trial_mapping_matches_responses_tsv(demo_root):
    nsd = NSD(demo_root)
    resp = pd.read_csv(demo_root / "nsddata/ppdata/subj02/behav/responses.tsv", sep="\t")
    ids, _ = nsd.expdesign.trials(2, len(resp))
    np.testing.assert_array_equal(ids, resp["73KID"].to_numpy() - 1)  # file is 1-based


def test_test_split_is_the_shared_images(demo_root):
    design = NSD(demo_root).expdesign
    ids, is_test = design.trials(1, design.masterordering.size)
    assert set(ids[is_test]) == set(design.sharedix - 1)
    assert not set(ids[~is_test]) & set(design.sharedix - 1)


def test_fewer_sessions_leave_images_with_one_or_two_repeats(demo_root):
    nsd = NSD(demo_root)
    cfg = DemoConfig()
    assert [nsd.sessions(s) for s in cfg.subjects] == [list(range(1, n + 1)) for n in cfg.sessions]
    assert len(nsd.sessions(2)) < max(cfg.sessions)
    ids, _ = nsd.expdesign.trials(2, len(nsd.sessions(2)) * nsd.n_trials(2, 1))
    counts = np.bincount(np.unique(ids, return_counts=True)[1])
    assert counts[1] > 0 and counts[2] > 0 and counts[3] > 0


def test_betas_nifti_and_hdf5_agree_and_follow_xyz_c_order(demo_root):
    nsd = NSD(demo_root)
    mask = nsd.read_roi(1, "nsdgeneral") == 1
    a = nsd.read_betas(1, 2, mask, "nifti")
    b = nsd.read_betas(1, 2, mask, "hdf5")
    np.testing.assert_array_equal(a, b)
    raw = np.asanyarray(nib.load(nsd.betas_path(1, 2, "nifti")).dataobj)
    i, j, k = np.argwhere(mask)[5]
    np.testing.assert_array_equal(a[:, 5], raw[i, j, k, :] / np.float32(300))
    with h5py.File(nsd.betas_path(1, 2, "hdf5")) as f:
        np.testing.assert_array_equal(b[:, 5], f["betas"][:, k, j, i] / np.float32(300))
    assert a.dtype == np.float32 and a.shape == (nsd.n_trials(1, 2), mask.sum())


def test_roi_values_and_ctab_names(demo_root):
    nsd = NSD(demo_root)
    general = nsd.read_roi(1, "nsdgeneral")
    assert set(np.unique(general)) == {-1, 0, 1}
    labels = nsd.roi_labels(1, "prf-visualrois")
    assert labels[1] == "V1v" and labels[7] == "hV4" and labels[0] == "Unknown"
    raw = (demo_root / "nsddata/freesurfer/subj01/label/prf-visualrois.mgz.ctab").read_text()
    assert "V1v\t" in raw  # the file carries trailing whitespace; the parser strips it
    assert read_ctab(demo_root / "nsddata/freesurfer/subj01/label/floc-faces.mgz.ctab")[2] == "FFA-1"


def test_captions_follow_coco_ids(demo_root):
    nsd = NSD(demo_root)
    ids = [0, 7, 100]
    caps = nsd.captions(ids)
    assert caps.shape == (3, 5)
    for row, image in zip(caps, ids):
        coco_id, split = nsd.stim_info.loc[image, ["cocoId", "cocoSplit"]]
        doc = json.loads(nsd.annotations_path("captions", split).read_text())
        expected = [a["caption"] for a in doc["annotations"] if a["image_id"] == coco_id][:5]
        assert list(row[: len(expected)]) == expected


def test_stimuli_are_lazy_uint8_rows_by_0_based_id(demo_root):
    with NSD(demo_root).stimuli() as brick:
        assert isinstance(brick, h5py.Dataset)
        assert brick.dtype == np.uint8 and brick.ndim == 4 and brick.shape[-1] == 3
        assert brick[[1, 3]].shape == (2, *brick.shape[1:])


def test_missing_root_and_bad_subject(demo_root, tmp_path):
    with pytest.raises(UserError, match="NSD root not found"):
        NSD(tmp_path / "nope")
    with pytest.raises(UserError, match="subject 9 is not in"):
        NSD(demo_root).expdesign.trials(9, 10)
    with pytest.raises(UserError, match="no betas for subject 3"):  # the demo writes subjects 1, 2, 5, 7
        NSD(demo_root).sessions(3)
