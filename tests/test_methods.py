"""The Method registry: a new method is one class + one registry line, and fit-adapters, decode,
evaluate and --drop-rois run it without knowing its name; the built-in methods from in-memory arrays."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from pipeline.data.fmri import prepare_fmri
from pipeline.decoding.run import decode_run
from pipeline.errors import UserError
from pipeline.evaluation.runs import evaluate_run
from pipeline.features.extract import extract_clip
from pipeline.fitting import methods
from pipeline.fitting.adapters.ridge import RidgeAdapter
from pipeline.fitting.fit import fit_adapters
from pipeline.fitting.methods import FitJob, RidgeMethod, method_class
from pipeline.fitting.pairs import Pairs
from pipeline.fitting.run_folder import RunInfo, read_run_info
from pipeline.store import take_rows


class TinyLeastSquares:
    """A whole new method in one class: least squares on the first ``n_voxels`` voxels."""

    name, takes_rois, trunk, every_process = "tiny", False, False, False

    def __init__(self, coef: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]], n_voxels: int):
        self.coef, self.shapes, self.n_voxels = dict(coef), {k: tuple(v) for k, v in shapes.items()}, n_voxels

    @classmethod
    def configure(cls, params: Mapping[str, Any], targets: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
        if set(params) - {"n_voxels"}:
            raise UserError(f"tiny takes n_voxels only, not {sorted(params)}")
        return {"n_voxels": 8, **params}, list(targets or ["image_embeds"])

    @classmethod
    def fit(cls, pairs: Pairs, folder: Path, params: Mapping[str, Any], job: FitJob) -> tuple[TinyLeastSquares, dict]:
        x = cls._design(pairs.betas("train")[:, : params["n_voxels"]])
        ids = pairs.image_ids("train")
        coef, shapes = {}, {}
        for t in pairs.targets:
            y = take_rows(pairs.target(t), ids).astype(np.float64)
            shapes[t] = y.shape[1:]
            coef[t] = np.linalg.lstsq(x, y.reshape(len(y), -1), rcond=None)[0]
        model = cls(coef, shapes, params["n_voxels"])
        model.save(folder)
        return cls.load(folder, {}), {"tiny_rows": int(len(ids))}

    @staticmethod
    def _design(x: np.ndarray) -> np.ndarray:
        return np.c_[np.asarray(x, np.float64), np.ones(len(x))]

    @classmethod
    def load(cls, folder: Path, facts: Mapping[str, Any]) -> TinyLeastSquares:
        spec = json.loads((folder / "tiny.json").read_text())
        with np.load(folder / "tiny.npz") as f:
            return cls({k: f[k] for k in spec["shapes"]}, spec["shapes"], spec["n_voxels"])

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "tiny.npz", **self.coef)
        (folder / "tiny.json").write_text(json.dumps({"shapes": self.shapes, "n_voxels": self.n_voxels}))
        return folder

    def predict(self, betas: np.ndarray, keep: np.ndarray | None = None,
                subject: int | None = None) -> dict[str, np.ndarray]:
        x = np.asarray(betas) if keep is None else np.asarray(betas) * keep
        x = self._design(x[:, : self.n_voxels])
        return {t: (x @ c).reshape(len(x), *self.shapes[t]).astype(np.float32) for t, c in self.coef.items()}

    def parameter_counts(self) -> dict[str, int]:
        return {t: int(c.size) for t, c in self.coef.items()}


@pytest.fixture(scope="module")
def caches(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("methods")
    return {"fmri": prepare_fmri(demo_root, 1, base / "subj01.zarr", progress=False),
            "clip": extract_clip(demo_root, base / "clip.zarr", model="nsd-tiny-vit", layers="2",
                                 pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"), progress=False)}


def test_a_registered_method_runs_through_fit_decode_and_evaluate(caches, demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "tiny", TinyLeastSquares)  # the one registry line
    run = tmp_path / "run"
    report = fit_adapters(caches["fmri"], caches["clip"], "tiny", run, params={"n_voxels": 6}, progress=False)
    info = read_run_info(run)
    assert (info.method, info.params, info.targets) == ("tiny", {"n_voxels": 6}, ["image_embeds"])
    assert info.extra["tiny_rows"] == zarr.open_group(caches["fmri"], mode="r")["train/image_ids"].shape[0]
    assert report["method"] == "tiny" and 0 <= report["targets"]["image_embeds"]["two_way_identification"] <= 1
    # the predictions are the class's own: refit by hand on the same rows and compare
    g = zarr.open_group(caches["fmri"], mode="r")
    preds = zarr.open_group(run / "predictions.zarr", mode="r")
    model = TinyLeastSquares.load(run / "adapters/tiny", {})
    ids = preds["test/image_ids"][:]
    test_ids, betas = g["test/image_ids"][:], g["test/betas"][:]
    mean = np.stack([model.predict(betas[test_ids == i])["image_embeds"].mean(0) for i in ids])
    np.testing.assert_allclose(preds["test/image_embeds"][:], mean, rtol=1e-4, atol=1e-5)

    decode_run(run, demo_root)
    rois = list(g.attrs.get("rois") or g["voxels"].array_keys())
    roi = next(r for r in rois if r.startswith(("floc", "prf")))
    out = evaluate_run(run, demo_root, drop_rois=[roi])
    assert out["method"] == "tiny" and (run / "metrics.json").is_file()
    assert "dropped_voxels" in out["drop_rois"][roi]


def test_method_names_and_their_own_errors():
    with pytest.raises(UserError, match="--method must be one of ridge, mclip, litemind, perception"):
        method_class("lasso")
    with pytest.raises(UserError, match="--targets for mclip: detail,semantic"):
        method_class("mclip").configure({}, ["image_embeds"])
    with pytest.raises(UserError, match="--targets for perception: one video-cache array"):
        method_class("perception").configure({}, ["frames", "frame_latents"])
    params, read = method_class("litemind").configure({"dropout": 0.1}, ["layers/2", "image_embeds"])
    assert params["targets"] == ["layers/2", "image_embeds"] and read == ["layers/2", "image_embeds"]
    params, read = method_class("mclip").configure({}, ["layers/2", "image_embeds", "text_embeds"])
    assert read == ["layers/2", "image_embeds", "text_embeds"] and params["text_target"] == "text_embeds"


def test_ridge_knows_every_constructor_setting():
    """dtype and fit_intercept were missing from the hand-copied key list."""
    params, read = RidgeMethod.configure({"dtype": "float64", "fit_intercept": False, "cv": 2}, None)
    assert read == ["image_embeds"] and params == {"dtype": "float64", "fit_intercept": False, "cv": 2}
    with pytest.raises(UserError, match=r"unknown ridge parameter\(s\) \['seed'\]"):
        RidgeMethod.configure({"seed": 3}, None)


def test_ridge_method_from_arrays_predicts_its_input_voxels_with_a_keep_mask(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    y = (x[:, 2:8] @ rng.standard_normal((6, 5))).astype(np.float32)
    idx = np.arange(2, 8)
    adapter = RidgeAdapter(alphas=[1e-3, 1.0], cv=2, backend="numpy", device="cpu")
    adapter.fit(x[:, idx], {"image_embeds": y}, out=tmp_path / "ridge")
    method = RidgeMethod.load(tmp_path / "ridge", {"input_voxels": idx.tolist()})
    keep = np.ones(12, bool)
    keep[3] = False
    got = method.predict(x, keep=keep)["image_embeds"]
    masked = x.copy()
    masked[:, 3] = 0
    np.testing.assert_allclose(got, adapter.predict(masked[:, idx])["image_embeds"], rtol=1e-6)
    assert method.parameter_counts() == {"coef": 5 * 6, "intercept": 5}


def test_run_info_round_trips_both_layouts():
    single = RunInfo(method="ridge", clip="c.zarr", targets=["image_embeds"], params={"cv": 2}, fmri="f.zarr",
                     clip_model="m", subject=1, extra={"input_voxels": [1], "alphas": {}})
    doc = single.to_json()
    assert list(doc)[:8] == ["method", "fmri", "clip", "subject", "targets", "params", "clip_model", "package_version"]
    assert RunInfo.from_json(json.loads(json.dumps(doc))) == single
    multi = RunInfo(method="mclip", clip="c.zarr", targets=["a"], params={}, fmri=["a.zarr", "b.zarr"],
                    subjects=[1, 2], extra={"fmri_settings": {}})
    doc = multi.to_json()
    assert doc["multi_subject"] is True and list(doc)[6:9] == ["multi_subject", "subjects", "fmri"]
    assert RunInfo.from_json(doc) == multi and multi.stores() == {"subj01": Path("a.zarr"), "subj02": Path("b.zarr")}
    with pytest.raises(UserError, match="no 'clip'"):
        RunInfo.from_json({"method": "x"})


def test_a_damaged_run_json_or_adapter_spec_is_one_line(tmp_path):
    """run.json, adapter.json and ridge's config.json go through one reader (pipeline.store.read_json)."""
    from pipeline.fitting.adapters.ridge import CONFIG, WEIGHTS
    from pipeline.fitting.models import SPEC_FILE, WEIGHTS_FILE, load_adapter

    (tmp_path / "run.json").write_text("{not json")
    for name in (SPEC_FILE, WEIGHTS_FILE, CONFIG, WEIGHTS):
        (tmp_path / name).write_text("{not json")
    for read in (read_run_info, load_adapter, RidgeAdapter.load):
        with pytest.raises(UserError, match=r"is not valid JSON") as exc:
            read(tmp_path)
        assert "\n" not in str(exc.value)
