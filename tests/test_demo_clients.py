"""The demo reads like NSD to other clients: the public ``nsd_access`` reader, pycocotools, and the
pandas idioms NSD users apply to its files.

``nsd_access`` (github.com/tknapen/nsd_access) is not on PyPI: install it from a clone with
``pip install --no-deps <clone>``; its test is skipped where it is absent. It imports IPython and
matplotlib at module level for features not used here (stand-ins are put in their place when they
are not installed) and calls nibabel's ``get_data``, which raises since nibabel 5 (patched to
``np.asanyarray(img.dataobj)``, the documented replacement).
"""

from __future__ import annotations

import json
import sys
import types

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline.data.fmri import prepare_fmri, zscore_session
from pipeline.data.nsd import BETA_SCALE, NSD, read_ctab
from pipeline.demo.nsd import COCO_SIZE, ROI_TABLES, SHAPES


@pytest.fixture
def nsda_module(monkeypatch: pytest.MonkeyPatch):
    for name in ("IPython", "matplotlib", "matplotlib.pyplot", "matplotlib.image"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.embed = lambda *a, **k: None
            monkeypatch.setitem(sys.modules, name, stub)
    if "matplotlib" in sys.modules and not hasattr(sys.modules["matplotlib"], "pyplot"):
        monkeypatch.setattr(sys.modules["matplotlib"], "pyplot", sys.modules["matplotlib.pyplot"], raising=False)
        monkeypatch.setattr(sys.modules["matplotlib"], "image", sys.modules["matplotlib.image"], raising=False)
    nsda = pytest.importorskip("nsd_access.nsda", reason="nsd_access is not installed (pip install --no-deps <clone>)")
    monkeypatch.setattr(nib.dataobj_images.DataobjImage, "get_data", lambda self: np.asanyarray(self.dataobj))
    return nsda


def test_nsd_access_reads_the_demo_as_prepare_fmri_does(demo_root, demo_fmri, nsda_module, tmp_path):
    nsda = nsda_module.NSDAccess(str(demo_root))
    nsd = NSD(demo_root)
    raw = zarr.open_group(prepare_fmri(demo_root, 1, tmp_path / "raw.zarr", zscore="none", repeats="trials",
                                       beta_format="nifti", progress=False), mode="r")
    mean = zarr.open_group(demo_fmri(), mode="r")

    # voxels and ROIs: the nsdgeneral mask, every ROI's labels and its .ctab names (from fsaverage/label)
    general, mapping = nsda.read_atlas_results("subj01", "nsdgeneral", data_format="func1pt8mm")
    mask = np.rint(general) == 1
    assert mapping == {"nsdgeneral\t": 1, "Unknown": 0}  # names as pandas reads them: trailing tab kept
    np.testing.assert_array_equal(raw["voxels/ijk"][:], np.argwhere(mask))
    for roi in ROI_TABLES:
        vol, names = nsda.read_atlas_results("subj01", roi, data_format="func1pt8mm")
        np.testing.assert_array_equal(raw[f"voxels/{roi}"][:], np.maximum(np.rint(vol[mask]), 0))
        ours = raw[f"voxels/{roi}"].attrs["labels"]
        assert {str(v): k.strip() for k, v in names.items()} == ours

    # betas, behaviour: trial by trial, session by session
    trial_rows = {int(t): ("train", i) for i, t in enumerate(raw["train/trial_ids"][:])}
    trial_rows.update({int(t): ("test", i) for i, t in enumerate(raw["test/trial_ids"][:])})
    n_t = nsd.n_trials(1, 1)
    z_parts, ids_all = [], []
    for session in nsd.sessions(1):
        betas = nsda.read_betas("subj01", session, data_type="betas_fithrf_GLMdenoise_RR", data_format="func1pt8mm")
        psc = betas[mask].T.astype(np.float64) / BETA_SCALE  # (T, V)
        behav = nsda.read_behavior("subj01", session)
        assert len(behav) == n_t == psc.shape[0]
        for k in range(n_t):
            split, row = trial_rows[(session - 1) * n_t + k]
            np.testing.assert_allclose(raw[f"{split}/betas"][row], psc[k], rtol=3e-7, atol=3e-7)
            assert raw[f"{split}/image_ids"][row] == behav["73KID"].iloc[k] - 1
        z_parts.append(zscore_session(psc)[0])
        ids_all.append(behav["73KID"].to_numpy() - 1)
    z, ids = np.concatenate(z_parts), np.concatenate(ids_all)
    for split in ("train", "test"):  # the default store: per-session z-score, then the mean per image
        expected = np.stack([z[ids == i].mean(0) for i in mean[f"{split}/image_ids"][:]])
        np.testing.assert_allclose(mean[f"{split}/betas"][:], expected, atol=2e-6)

    # images, captions and categories of some images from both COCO splits
    sample = np.sort(np.concatenate([np.flatnonzero(nsd.stim_info["cocoSplit"] == s)[:3] for s in ("train2017", "val2017")]))
    with nsd.stimuli() as brick:
        np.testing.assert_array_equal(nsda.read_images(list(sample)), brick[sample])
    anns = nsda.read_image_coco_info(list(sample), info_type="captions")
    ours = nsd.captions(sample, per_image=6)
    assert [[a["caption"] for a in image] for image in anns] == [[c for c in row if c] for row in ours]
    names, hot = nsd.categories(sample)
    cats = nsda.read_image_coco_category(list(sample))
    assert cats == [[names[j] for j in np.flatnonzero(row)] for row in hot]
    assert nsda.read_image_coco_info([int(sample[0])], info_type="instances")[0]["bbox"]


def test_coco_files_follow_the_coco_schema(demo_root):
    from pycocotools.coco import COCO

    nsd = NSD(demo_root)
    ann_ids: dict[str, list[int]] = {"captions": [], "instances": []}
    width, height = COCO_SIZE
    for split in ("train2017", "val2017"):
        caps_doc = json.loads(nsd.annotations_path("captions", split).read_text())
        assert "categories" not in caps_doc  # real caption files have none; pycocotools would index them as instances
        caps = COCO(str(nsd.annotations_path("captions", split)))
        inst = COCO(str(nsd.annotations_path("instances", split)))
        assert not caps.cats and sorted(inst.getCatIds()) == list(range(1, len(SHAPES) + 1))
        for kind, coco in (("captions", caps), ("instances", inst)):
            ann_ids[kind] += coco.getAnnIds()
            assert all(img["width"] == width and img["height"] == height for img in coco.dataset["images"])
        info = nsd.stim_info[nsd.stim_info["cocoSplit"] == split]
        for nsd_id, coco_id in zip(info.index[:20], info["cocoId"][:20]):
            assert 5 <= len(caps.getAnnIds(imgIds=[coco_id])) <= 6
            (ann,) = inst.loadAnns(inst.getAnnIds(imgIds=[coco_id]))
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h, abs=0.1) and w > 0 and h > 0
            crop = (width - height) / 2  # cropBox (0, 0, 0.125, 0.125): the stimulus is the centre square
            assert crop <= x and x + w <= width - crop + 1e-6 and 0 <= y and y + h <= height + 1e-6
            assert inst.loadCats(ann["category_id"])[0]["name"] == SHAPES[nsd_id % len(SHAPES)]
            assert inst.annToMask(ann).sum() > 0  # the segmentation rasterises
    for kind, ids in ann_ids.items():
        assert len(ids) == len(set(ids)), f"{kind} annotation ids repeat across files"


def test_shape_bbox_covers_the_drawn_shape(demo_root):
    """The bbox, mapped back to stimulus pixels, holds the pixels of the foreground colour."""
    from pipeline.demo.nsd import COLOURS

    nsd = NSD(demo_root)
    i = 1  # a square: a compact shape
    coco_id, split = nsd.stim_info.loc[i, ["cocoId", "cocoSplit"]]
    doc = json.loads(nsd.annotations_path("instances", split).read_text())
    (ann,) = [a for a in doc["annotations"] if a["image_id"] == coco_id]
    with nsd.stimuli() as brick:
        img = brick[i].astype(float)
    size = img.shape[0]
    scale = size / COCO_SIZE[1]
    x0, y0 = (ann["bbox"][0] - (COCO_SIZE[0] - COCO_SIZE[1]) / 2) * scale, ann["bbox"][1] * scale
    x1, y1 = x0 + ann["bbox"][2] * scale, y0 + ann["bbox"][3] * scale
    fg = np.array([COLOURS[c] for c in COLOURS])
    dist = ((img[..., None, :] - fg) ** 2).sum(-1)
    colour = dist.argmin(-1)
    inside = np.zeros((size, size), bool)
    inside[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = True
    main = np.bincount(colour[inside].ravel()).argmax()
    assert (colour[~inside] != main).mean() > 0.95  # outside the box: background


def test_ctab_tables_are_also_under_fsaverage(demo_root):
    for roi, names in ROI_TABLES.items():
        subj = demo_root / f"nsddata/freesurfer/subj01/label/{roi}.mgz.ctab"
        fsavg = demo_root / f"nsddata/freesurfer/fsaverage/label/{roi}.mgz.ctab"
        assert fsavg.read_text() == subj.read_text()
        table = pd.read_csv(fsavg, delimiter=" ", header=None, index_col=0)  # the common pandas idiom
        assert [n.strip() for n in table[1]] == ["Unknown", *names]
        assert read_ctab(fsavg) == dict(enumerate(["Unknown", *names]))


def test_read_ctab_strips_tabs_and_spaces(tmp_path):
    path = tmp_path / "Kastner2015.mgz.ctab"
    path.write_text("0 Unknown\n1 V1v\t    \n25 FEF\t\n")
    assert read_ctab(path) == {0: "Unknown", 1: "V1v", 25: "FEF"}


def test_responses_tsv_records_old_images_and_answers(demo_root):
    for subject in (1, 2):
        resp = pd.read_csv(demo_root / f"nsddata/ppdata/subj{subject:02d}/behav/responses.tsv", sep="\t")
        assert resp.shape[1] == 19 and not resp[["TIME", "ISOLD", "ISCORRECT", "RT", "BUTTON"]].isna().any().any()
        seen, seen_session, old, old_current = set(), set(), [], []
        for img, sess in zip(resp["73KID"], resp["SESSION"]):  # independent: shown on an earlier trial?
            old.append(int(img in seen))
            old_current.append(int((img, sess) in seen_session))
            seen.add(img)
            seen_session.add((img, sess))
        np.testing.assert_array_equal(resp["ISOLD"], old)
        np.testing.assert_array_equal(resp["ISOLDCURRENT"], old_current)
        np.testing.assert_array_equal(resp["MEMORYRECENT"].isna(), resp["ISOLD"] == 0)
        assert (resp["MEMORYRECENT"].dropna() <= resp["MEMORYFIRST"].dropna()).all()
        np.testing.assert_array_equal(resp["ISCORRECT"], (resp["BUTTON"] == 2) == (resp["ISOLD"] == 1))
        assert set(resp["BUTTON"]) == {1, 2} and 0.7 < resp["ISCORRECT"].mean() < 0.9
        assert (resp["TOTAL1"] + resp["TOTAL2"] == 1).all() and (resp["MISSINGDATA"] == 0).all()
        assert resp["RT"].between(200, 3000).all()
        for _, sess in resp.groupby("SESSION"):
            assert (np.diff(sess["TIME"]) > 0).all() and np.ptp(sess["TIME"]) < 1  # within one day
        if subject == 1:  # fewer sessions than the design: some images shown once or twice only
            assert resp["ISOLD"].mean() == pytest.approx(1 - resp["73KID"].nunique() / len(resp))
