"""The GOD path end to end on the look-alike: prepare-fmri --source god -> extract-clip over the image
brick -> fit-adapters -> evaluate (the zero-shot protocol), and its bad inputs.

The CLIP model here is the tiny ViT with random weights (no demo build): its image embeddings follow
the images (so fMRI->image retrieval is above chance), its random text tower carries no class names
(so zero-shot accuracy through CLIP text is at chance, and is only checked to be reported with its
chance levels). Recovering the planted classes is checked through the store's ids against the
look-alike's planted truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pipeline.data.god import BRICK, CAPTION_TEMPLATES, GOD, synset_of
from pipeline.data.god_store import prepare_god
from pipeline.data.registry import open_dataset
from pipeline.demo.god import GODDemoConfig, make_god_demo
from pipeline.errors import UserError
from pipeline.evaluation.god_zeroshot import god_zeroshot


@pytest.fixture(scope="module")
def god_run(tmp_path_factory) -> dict[str, Path]:
    from pipeline.evaluation.runs import evaluate_run
    from pipeline.features.extract import extract_clip
    from pipeline.fitting.fit import fit_adapters

    base = tmp_path_factory.mktemp("god_run")
    demo = make_god_demo(base / "demo", GODDemoConfig(noise=0.5))
    store = prepare_god(demo, 1, base / "fmri" / "god_subj01.zarr")
    clip = extract_clip(base / "fmri" / BRICK, base / "clip.zarr", model="nsd-tiny-vit", pretrained="none",
                        layers="6:proj", captions=True, device="cpu", progress=False)
    run = base / "runs" / "god_ridge"
    fit_adapters(store, clip, "ridge", run, targets=["image_embeds", "text_embeds"],
                       params={"alphas": [1.0, 10.0, 100.0, 1000.0], "cv": 3}, device="cpu", progress=False)
    evaluate_run(run, demo, device="cpu")
    return {"demo": demo, "store": store, "clip": clip, "run": run}


def test_store_rows_are_the_brick_rows_and_held_out_classes_never_train(god_run):
    group = zarr.open_group(god_run["store"], mode="r")
    ids = list(group.attrs["stimulus_ids"])
    assert group.attrs["dataset"] == "god" and group.attrs["god_rois"] == ["VC"] and group.attrs["zscore"] == "train"
    assert (group["voxels/VC"][...] == 1).all() and 0 < group["voxels/HVC"][...].sum() < group["voxels/VC"].shape[0]
    train = {synset_of(ids[i]) for i in group["train/image_ids"][...]}
    test = [ids[i] for i in group["test/image_ids"][...]]
    assert not train & {synset_of(s) for s in test}
    god = GOD(god_run["demo"] / "fmri")
    # test rows: one per test image, the mean of its repetitions (the reader's average)
    want = god.split(1, "test")
    assert test == list(want.stimuli)
    np.testing.assert_allclose(group["test/betas"][...], want.betas, rtol=1e-6)
    assert (group["test/n_repeats"][...] == GODDemoConfig().test_reps).all()
    with open_dataset("god", god_run["store"].parent).stimuli() as brick, h5py.File(god_run["store"].parent / BRICK) as f:
        assert [s.decode() for s in f["stimulus_ids"][()]] == ids
        row = ids.index(test[0])
        np.testing.assert_array_equal(brick[row], GOD(god.root, god_run["demo"] / "images").load_images([test[0]])[0])
        name = god.class_names([synset_of(test[0])])[0]
        assert [c.decode() for c in f["captions"][row]] == [t.format(name) for t in CAPTION_TEMPLATES]


def test_planted_classes_recovered_through_the_store_ids(god_run):
    """Ridge from the store's train rows to the planted image embeddings, scored with the planted class
    embeddings on the store's test rows: far above the 1/K chance (ids map rows to the right images)."""
    group = zarr.open_group(god_run["store"], mode="r")
    ids = list(group.attrs["stimulus_ids"])
    planted = np.load(god_run["demo"] / "planted.npz")
    emb = dict(zip(planted["image_ids"].tolist(), planted["image_embeds"]))
    x = group["train/betas"][...].astype(np.float64)
    y = np.stack([emb[ids[i]] for i in group["train/image_ids"][...]])
    w = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ y)
    test = [ids[i] for i in group["test/image_ids"][...]]
    held = sorted({synset_of(s) for s in test})
    cls = dict(zip(planted["class_synsets"].tolist(), planted["class_embeds"]))
    result = god_zeroshot(group["test/betas"][...] @ w, test, np.stack([cls[s] for s in held]), held)
    assert result["top1"] >= 5 * result["chance_top1"]


def test_evaluate_reports_the_god_protocol(god_run):
    metrics = json.loads((god_run["run"] / "metrics.json").read_text())
    k = GODDemoConfig().n_test_classes
    assert metrics["protocol"] == "god-zeroshot" and metrics["n_classes"] == k == metrics["n_test"]
    assert metrics["chance_top1"] == pytest.approx(1 / k) and metrics["chance_top5"] == pytest.approx(5 / k)
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert metrics["fmri_to_image_top1"] >= 3 * metrics["chance_fmri_to_image_top1"]
    cache = zarr.open_group(god_run["clip"], mode="r")
    assert cache["text_embeds"].shape[:2] == (len(zarr.open_group(god_run["store"]).attrs["stimulus_ids"]), 5)
    assert "captions" in cache.attrs["captions"]["source"]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_images_one_line_nothing_written(tmp_path):
    demo = make_god_demo(tmp_path / "demo", GODDemoConfig())
    gone = sorted((demo / "images").iterdir())[:3]
    for p in gone:
        p.unlink()
    with pytest.raises(UserError) as excinfo:
        prepare_god(demo, 1, tmp_path / "out" / "s.zarr")
    assert "3 of" in _one_line(excinfo) and gone[0].stem in str(excinfo.value)
    assert not (tmp_path / "out" / "s.zarr").exists() and not (tmp_path / "out" / BRICK).exists()


def test_bad_rois_and_foreign_brick_one_line(tmp_path):
    demo = make_god_demo(tmp_path / "demo", GODDemoConfig())
    with pytest.raises(UserError) as excinfo:
        prepare_god(demo, 1, tmp_path / "s.zarr", rois=("V9",))
    assert "V9" in _one_line(excinfo)
    with h5py.File(tmp_path / BRICK, "w") as f:
        f.create_dataset("stimulus_ids", data=[b"n00000000_1"])
    with pytest.raises(UserError) as excinfo:
        prepare_god(demo, 1, tmp_path / "s.zarr")
    assert "other GOD stimuli" in _one_line(excinfo)
    assert not (tmp_path / "s.zarr").exists()


def test_class_table_missing_a_test_synset_one_line(tmp_path):
    demo = make_god_demo(tmp_path / "demo", GODDemoConfig())
    table = tmp_path / "classes.tsv"
    rows = (Path(__file__).parents[1] / "pipeline/data/god_classes.tsv").read_text().splitlines()
    test_synset = sorted(p.stem for p in (demo / "images").iterdir())[-1].split("_")[0]
    table.write_text("\n".join(r for r in rows if not r.startswith(test_synset)) + "\n")
    god = GOD(demo / "fmri", demo / "images", classes=table)
    with pytest.raises(UserError) as excinfo:
        god.write_image_brick([s.stem for s in sorted((demo / "images").iterdir())], tmp_path / BRICK, size=16)
    assert test_synset in _one_line(excinfo)
    assert not (tmp_path / BRICK).exists()
