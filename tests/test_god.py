"""GOD: the h5py BData reader against bdpy's, the splits, bad input, and the zero-shot protocol on
the look-alike's planted category code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.demo.god import GODDemoConfig, make_god_demo
from pipeline.data.god import CLASS_TABLE, GOD, ROIS, load_class_table, read_bdata, stimulus_id
from pipeline.errors import UserError
from pipeline.evaluation.god_zeroshot import god_zeroshot, held_out_classes


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_god_demo(tmp_path_factory.mktemp("god") / "demo", GODDemoConfig(subjects=(1, 2)))


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_reader_matches_bdpy(demo):
    bdpy = pytest.importorskip("bdpy")  # the reference reader (test extra); the reader itself needs only h5py
    path = demo / "fmri" / "Subject2.h5"
    ref, mine = bdpy.BData(str(path)), read_bdata(path)
    assert list(mine.keys) == ref.metadata.key
    assert list(mine.descriptions) == ref.metadata.description
    np.testing.assert_array_equal(mine.dataset, ref.dataset)
    np.testing.assert_array_equal(mine.values, ref.metadata.value)
    for key in ["VoxelData", "DataType", "Run", "stimulus_id"] + [f"ROI_{r}" for r in ROIS]:
        np.testing.assert_array_equal(mine.select(key), ref.select(key), err_msg=key)
    for axis in "xyz":
        np.testing.assert_array_equal(mine.metadata(f"voxel_{axis}", "VoxelData"),
                                      ref.get_metadata(f"voxel_{axis}", where="VoxelData"))


def test_splits_match_bdpy_samples_and_labels(demo):
    bdpy = pytest.importorskip("bdpy")
    ref = bdpy.BData(str(demo / "fmri" / "Subject1.h5"))
    god = GOD(demo / "fmri", demo / "images")
    kind = ref.select("DataType")[:, 0]
    labels = ref.select("stimulus_id")[:, 0]
    for split, value in (("train", 1), ("test", 2), ("imagery", 3)):
        got = god.split(1, split, rois=("V1", "FFA"), normalize="none", average=False)
        np.testing.assert_allclose(got.betas, ref.select("ROI_V1 | ROI_FFA")[kind == value], rtol=1e-6)
        assert got.stimuli == tuple(stimulus_id(v) for v in labels[kind == value])
        np.testing.assert_array_equal(got.runs, ref.select("Run")[kind == value, 0])
    assert god.voxel_xyz(1, ("V1", "FFA")).shape == (got.betas.shape[1], 3)


def test_label_encoding_of_the_release():
    # values from KamitaniLab/GenericObjectDecoding data/stimulus_ImageNet{Training,Test}.tsv
    assert stimulus_id(1518878.010042) == "n01518878_10042"
    assert stimulus_id(13111881.00656) == "n13111881_6560"
    assert stimulus_id(1621127.01902) == "n01621127_19020"
    assert stimulus_id(1443537.0) == "n01443537"  # imagery: category only


def test_averaging_and_normalisation(demo):
    god = GOD(demo / "fmri")
    raw = god.split(1, "test", normalize="none", average=False)
    avg = god.split(1, "test", normalize="none")
    assert len(set(raw.stimuli)) == len(avg.stimuli) == 20 and len(raw.stimuli) == 80
    first = np.array(raw.stimuli) == avg.stimuli[0]
    np.testing.assert_allclose(avg.betas[0], raw.betas[first].mean(0), rtol=1e-5)
    train = god.split(1, "train")
    np.testing.assert_allclose(train.betas.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train.betas.std(0, ddof=1), 1, atol=1e-4)
    per_run = god.split(1, "train", normalize="run")
    test_runs = god.split(1, "test", normalize="run", average=False)
    for split in (per_run, test_runs):
        for r in np.unique(split.runs):
            np.testing.assert_allclose(split.betas[split.runs == r].mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(split.betas[split.runs == r].std(0), 1, atol=1e-4)


def test_held_out_categories_never_in_training(demo):
    god = GOD(demo / "fmri")
    train, test, imagery = (god.split(1, s) for s in ("train", "test", "imagery"))
    held = held_out_classes(train.stimuli, test.stimuli)
    assert not set(held) & set(train.synsets) and set(imagery.synsets) == set(held)
    table = load_class_table()
    by_split = {s: {k for k, (sp, _) in table.items() if sp == s} for s in ("train", "test")}
    assert len(by_split["train"]) == 150 and len(by_split["test"]) == 50
    assert set(held) <= by_split["test"] and set(train.synsets) <= by_split["train"]
    with pytest.raises(UserError) as exc:
        held_out_classes(train.stimuli, train.stimuli[:3])
    assert "not zero-shot" in _one_line_error(exc)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def test_zero_shot_recovers_planted_classes(demo):
    god = GOD(demo / "fmri", demo / "images")
    planted = np.load(demo / "planted.npz")
    image_row = {s: i for i, s in enumerate(planted["image_ids"])}
    train, test = god.split(1, "train"), god.split(1, "test")
    classes = held_out_classes(train.stimuli, test.stimuli)
    class_emb = planted["class_embeds"][[list(planted["class_synsets"]).index(s) for s in classes]]
    y_train = planted["image_embeds"][[image_row[s] for s in train.stimuli]]
    image_emb = planted["image_embeds"][[image_row[s] for s in test.stimuli]]
    pred = test.betas @ _ridge(train.betas, y_train, alpha=10.0)
    got = god_zeroshot(pred, test.stimuli, class_emb, classes, image_emb)
    assert got["protocol"] == "god-zeroshot" and got["n_classes"] == 20 and got["chance_top1"] == 0.05
    # chance: top-1 0.05, top-5 0.25, retrieval 0.05 (seeds 0-5 of the look-alike: top-1 0.8-0.95)
    assert got["top1"] >= 0.6 and got["top5"] >= 0.8 and got["fmri_to_image_top1"] >= 0.6
    # the same decoder fitted on shuffled training pairs: no planted code, near chance
    shuffled = test.betas @ _ridge(train.betas, np.random.default_rng(0).permutation(y_train), alpha=10.0)
    assert god_zeroshot(shuffled, test.stimuli, class_emb, classes)["top1"] <= 0.25


def test_label_key_before_2019(tmp_path):
    demo = make_god_demo(tmp_path / "old", replace(GODDemoConfig(), label_key="Label", n_train_classes=5))
    assert "Label" in read_bdata(demo / "fmri" / "Subject1.h5").keys
    assert len(GOD(demo / "fmri").split(1, "test").stimuli) == 20


def _drop_key(src: Path, dst: Path, key: str) -> None:
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        keep = [i for i, k in enumerate(f["metadata/key"][()]) if k.decode() != key]
        g["dataset"] = f["dataset"][()]
        for name in ("key", "description", "value"):
            g[f"metadata/{name}"] = f[f"metadata/{name}"][()][keep]


def test_bad_input_is_one_line(demo, tmp_path):
    (tmp_path / "fmri").mkdir()
    _drop_key(demo / "fmri" / "Subject1.h5", tmp_path / "fmri" / "Subject1.h5", "DataType")
    with pytest.raises(UserError) as exc:
        GOD(tmp_path / "fmri").split(1, "train")
    assert "DataType" in _one_line_error(exc)
    with h5py.File(tmp_path / "fmri" / "Subject3.h5", "w") as f:
        f["dataset"] = np.zeros((2, 2))
    with pytest.raises(UserError) as exc:
        GOD(tmp_path / "fmri").split(3, "train")
    assert "not a BData file" in _one_line_error(exc)
    _drop_key(demo / "fmri" / "Subject1.h5", tmp_path / "fmri" / "Subject4.h5", "voxel_y")
    with pytest.raises(UserError) as exc:
        GOD(tmp_path / "fmri").voxel_xyz(4)
    assert "voxel_y" in _one_line_error(exc)
    with pytest.raises(UserError) as exc:
        GOD(demo / "fmri").split(1, "train", rois=("V9",))
    assert "V9" in _one_line_error(exc)

    images = tmp_path / "images"
    images.mkdir()
    god = GOD(demo / "fmri", images)
    stimuli = god.split(1, "test").stimuli
    for s in stimuli[3:]:
        (images / f"{s}.JPEG").write_bytes((demo / "images" / f"{s}.JPEG").read_bytes())
    with pytest.raises(UserError) as exc:
        god.image_paths(stimuli)
    assert _one_line_error(exc).startswith("3 of 20 GOD images not found") and stimuli[0] in str(exc.value)

    table = tmp_path / "classes.tsv"
    lines = CLASS_TABLE.read_text().splitlines()
    table.write_text("\n".join(line for line in lines if not line.startswith(stimuli[0][:9])) + "\n")
    with pytest.raises(UserError) as exc:
        GOD(demo / "fmri", classes=table).class_names([s[:9] for s in stimuli])
    assert stimuli[0][:9] in _one_line_error(exc)
    with pytest.raises(UserError) as exc:
        god_zeroshot(np.zeros((20, 4)), stimuli, np.ones((19, 4)), [s[:9] for s in stimuli[1:]])
    assert "no class embedding" in _one_line_error(exc)


def test_image_brick_for_extract_clip(demo, tmp_path):
    god = GOD(demo / "fmri", demo / "images")
    stimuli = god.split(1, "test").stimuli
    out = god.write_image_brick(stimuli, tmp_path / "god_stimuli.hdf5", size=24)
    with h5py.File(out) as f:
        brick, ids = f["imgBrick"][()], [s.decode() for s in f["stimulus_ids"][()]]
    assert brick.shape == (20, 24, 24, 3) and brick.dtype == np.uint8 and ids == list(stimuli)
    with Image.open(demo / "images" / f"{stimuli[4]}.JPEG") as img:  # the look-alike's images are square
        np.testing.assert_array_equal(brick[4], np.asarray(img.convert("RGB").resize((24, 24), Image.BICUBIC)))
    with pytest.raises(UserError):
        god.write_image_brick([*stimuli, "n01443537_1"], tmp_path / "partial.hdf5")
    assert not list(tmp_path.glob("partial*"))
