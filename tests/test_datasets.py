"""The Dataset protocol: a second image dataset is one class plus one registry line, and the
consumers (here evaluate) read its stimuli through the registry instead of NSD's files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.data import registry
from pipeline.data.dataset import DatasetBase
from pipeline.data.nsd import NSD
from pipeline.decoding import decode
from pipeline.errors import UserError
from pipeline.evaluation.runs import evaluate_run
from pipeline.fitting.run_folder import RunInfo, write_run_info

IMAGES = np.random.default_rng(0).integers(0, 256, (10, 24, 32, 3), dtype=np.uint8)


class TinyImages(DatasetBase):
    """A stimulus-only image set held in memory: this class is the whole dataset."""

    name = "tiny"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @contextmanager
    def stimuli(self) -> Iterator[np.ndarray]:
        yield IMAGES


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.DATASETS, "tiny", TinyImages)  # the one registry line


def _decoded_run(base: Path, test_ids: np.ndarray, shown: np.ndarray, dataset: str | None = "tiny") -> Path:
    """A run folder whose fMRI store names ``dataset`` and whose reconstruction of test image
    ``test_ids[k]`` is stimulus ``shown[k]`` (no CLIP cache: evaluate scores the images only)."""
    store = zarr.open_group(base / "subj01.zarr", mode="w")
    store.create_array("test/image_ids", data=test_ids)
    if dataset is not None:
        store.attrs["dataset"] = dataset
    run = base / "run"
    preds = zarr.open_group(run / "predictions.zarr", mode="w")
    preds.create_array("test/image_ids", data=test_ids)
    write_run_info(run, RunInfo(method="ridge", fmri=str(base / "subj01.zarr"), clip=str(base / "no_clip.zarr"),
                                targets=["image_embeds"], params={}))
    decode.write_reconstructions(run / "recon", test_ids, IMAGES[shown])
    return run


def test_a_registered_dataset_is_what_evaluate_scores_against(tiny, tmp_path):
    ids = np.array([1, 4, 7, 8])
    exact = evaluate_run(_decoded_run(tmp_path / "a", ids, ids), tmp_path / "empty_root")
    assert exact["reconstruction"]["PixCorr"] == pytest.approx(1.0, abs=1e-6)
    assert exact["reconstruction"]["SSIM"] == pytest.approx(1.0, abs=1e-4)
    swapped = evaluate_run(_decoded_run(tmp_path / "b", ids, ids[::-1]), tmp_path / "empty_root")
    assert swapped["reconstruction"]["PixCorr"] < 0.2  # independent random images
    assert "CLIP cache of the run not found" in exact["unavailable"]["zero_shot"]


def test_evaluate_takes_the_dataset_by_name_and_root_alias(tiny, tmp_path):
    """A store that names no dataset is NSD's; ``dataset=`` overrides it, ``nsd_root=`` is the root."""
    ids = np.array([2, 3])
    run = _decoded_run(tmp_path, ids, ids, dataset=None)
    with pytest.raises(UserError, match="NSD root not found"):
        evaluate_run(run, tmp_path / "empty_root")
    out = evaluate_run(run, nsd_root=tmp_path / "empty_root", dataset="tiny")
    assert out["reconstruction"]["PixCorr"] == pytest.approx(1.0, abs=1e-6)


def test_unregistered_and_unanswered_questions_are_one_line_errors(tiny, tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'gone' \(known: .*\bcc2017, .*\bnsd, tiny\)") as err:
        registry.open_dataset("gone", tmp_path)
    assert str(err.value).endswith(f"(known: {', '.join(sorted(registry.DATASETS))})")
    data = registry.open_dataset("tiny", tmp_path)
    for question, what in ((lambda: data.captions([0]), "captions"), (lambda: data.categories([0]), "category labels"),
                           (lambda: data.trials(1, [1]), "fMRI trials")):
        with pytest.raises(UserError, match=rf"^dataset 'tiny' has no {what}$"):
            question()


def test_run_stores_from_two_datasets_are_refused(tiny, tmp_path):
    for name, dataset in (("a", "tiny"), ("b", None)):
        zarr.open_group(tmp_path / name, mode="w").attrs.update({"dataset": dataset} if dataset else {})
    stores = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(UserError, match="different datasets"):
        registry.run_dataset(stores, tmp_path)
    assert isinstance(registry.run_dataset(stores, tmp_path, "tiny"), TinyImages)


def test_nsd_answers_the_protocol_from_the_demo_tree(demo_root):
    """NSD's trials and voxels are what its design file and ROI volumes say."""
    nsd = registry.open_dataset("nsd", demo_root)
    assert isinstance(nsd, NSD) and nsd.name == "nsd"
    sessions = nsd.sessions(1)
    trials = nsd.trials(1, sessions[:2])
    n = sum(nsd.n_trials(1, s) for s in sessions[:2])
    assert trials.session_bounds[-1][1] == n == len(trials.image_ids)
    ids, is_test = nsd.expdesign.trials(1, n)
    np.testing.assert_array_equal(trials.image_ids, ids)
    np.testing.assert_array_equal(trials.is_test, is_test)
    voxels = nsd.voxels(1)
    general = nsd.read_roi(1, "nsdgeneral")
    np.testing.assert_array_equal(voxels.ijk, np.argwhere(general == 1))
    assert set(voxels.rois) == set(nsd.available_rois(1))
    betas = nsd.read_session(1, sessions[0], voxels)
    assert betas.shape == (trials.session_bounds[0][1], voxels.n)
