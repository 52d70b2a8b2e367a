"""MindEye2 / MindEye1 / Brain-Diffuser releases: look-alikes derived from the demo's raw NSD tree give
the same stores as raw NSD (after each release's normalisation), their stimuli the same pixels, and
bad releases one-line errors with nothing written."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pipeline.demo.releases import make_brain_diffuser, make_mindeye1, make_mindeye2, old_sessions
from pipeline.data.fmri import prepare_fmri
from pipeline.data.nsd import NSD
from pipeline.data.releases import prepare_release
from pipeline.data.releases.mindeye2 import betas_path, wds_dir
from pipeline.errors import UserError

SUBJECT = 1


@pytest.fixture(scope="module")
def releases(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("releases")
    return {
        "mindeye2": make_mindeye2(demo_root, base / "mindeyev2", subjects=(SUBJECT,)),
        "mindeye1": make_mindeye1(demo_root, base / "webdataset_avg_split", subjects=(SUBJECT,)),
        "brain-diffuser": make_brain_diffuser(demo_root, base / "bd_data", subjects=(SUBJECT,)),
    }


@pytest.fixture(scope="module")
def n_old(demo_root: Path) -> int:
    return old_sessions(len(NSD(demo_root).sessions(SUBJECT)))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{s}/{k}": root[s][k][...] for s in ("train", "test") for k in root[s].array_keys()}


def _assert_same(release: Path, raw: Path) -> None:
    a, b = _arrays(release), _arrays(raw)
    assert sorted(a) == sorted(b)
    for key in a:
        if key.endswith("betas"):
            np.testing.assert_allclose(a[key], b[key], atol=2e-4, rtol=1e-4, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# MindEye2's betas: z-scored per voxel with the statistics of every training trial (all sessions)
@pytest.mark.parametrize("repeats", ["mean", "train-trials", "trials"])
def test_mindeye2_equals_raw_zscore_train(releases, demo_root, tmp_path, repeats):
    raw = prepare_fmri(demo_root, SUBJECT, tmp_path / "raw.zarr", zscore="train", repeats=repeats, progress=False)
    got = prepare_release("mindeye2", releases["mindeye2"], SUBJECT, tmp_path / "me2.zarr", repeats=repeats)
    _assert_same(got, raw)
    attrs = zarr.open_group(str(got), mode="r").attrs
    assert (attrs["zscore"], attrs["zscore_upstream"], attrs["test_set"]) == ("train", True, "new")
    assert attrs["sessions"] == zarr.open_group(str(raw), mode="r").attrs["sessions"]
    assert attrs["trials_per_session"] == zarr.open_group(str(raw), mode="r").attrs["trials_per_session"]


def test_mindeye2_old_test_set_and_sessions(releases, demo_root, tmp_path, n_old):
    nsd = NSD(demo_root)
    n_trials = sum(nsd.n_trials(SUBJECT, s) for s in range(1, n_old + 1))
    _, shared = nsd.expdesign.trials(SUBJECT, n_trials)
    old = prepare_release("mindeye2", releases["mindeye2"], SUBJECT, tmp_path / "old.zarr", test_set="old",
                          repeats="trials")
    assert zarr.open_group(str(old), mode="r")["test/trial_ids"].shape[0] == shared.sum()
    # --sessions K keeps sessions 1..K of train and test; upstream statistics stay those of all sessions
    few = prepare_release("mindeye2", releases["mindeye2"], SUBJECT, tmp_path / "few.zarr", sessions=n_old,
                          repeats="trials")
    trial_ids = np.concatenate([zarr.open_group(str(few), mode="r")[f"{s}/trial_ids"][...] for s in ("train", "test")])
    assert trial_ids.max() < n_trials and len(trial_ids) == n_trials


@pytest.mark.parametrize("repeats", ["mean", "train-trials"])
def test_mindeye1_equals_raw_session_zscore(releases, demo_root, tmp_path, n_old, repeats):
    raw = prepare_fmri(demo_root, SUBJECT, tmp_path / "raw.zarr", sessions=n_old, zscore="session",
                       repeats=repeats, progress=False)
    got = prepare_release("mindeye1", releases["mindeye1"], SUBJECT, tmp_path / "me1.zarr", repeats=repeats)
    _assert_same(got, raw)  # per-trial rows: the num_uniques real repetitions, never the padding


def test_brain_diffuser_equals_raw_psc(releases, demo_root, tmp_path, n_old):
    raw = prepare_fmri(demo_root, SUBJECT, tmp_path / "raw.zarr", sessions=n_old, zscore="none", progress=False)
    got = prepare_release("brain-diffuser", releases["brain-diffuser"], SUBJECT, tmp_path / "bd.zarr")
    _assert_same(got, raw)
    assert zarr.open_group(str(got), mode="r").attrs["sessions"] == list(range(1, n_old + 1))


def test_rois_from_restores_labels_and_ijk(releases, demo_root, tmp_path):
    raw = zarr.open_group(str(prepare_fmri(demo_root, SUBJECT, tmp_path / "raw.zarr", zscore="train",
                                           progress=False)), mode="r")
    bare = zarr.open_group(str(prepare_release("mindeye2", releases["mindeye2"], SUBJECT, tmp_path / "a.zarr")),
                           mode="r")
    assert "voxels" not in bare and bare.attrs["rois"] == []
    got = zarr.open_group(str(prepare_release("mindeye2", releases["mindeye2"], SUBJECT, tmp_path / "b.zarr",
                                              rois_from=demo_root)), mode="r")
    assert got.attrs["rois"] == raw.attrs["rois"]
    for name in [*raw.attrs["rois"], "ijk"]:
        np.testing.assert_array_equal(got[f"voxels/{name}"][...], raw[f"voxels/{name}"][...])
    assert dict(got["voxels/prf-visualrois"].attrs) == dict(raw["voxels/prf-visualrois"].attrs)


@pytest.fixture(scope="module")
def clip_cache(demo_root, tmp_path_factory) -> Path:
    from pipeline.features.extract import extract_clip

    return extract_clip(demo_root, tmp_path_factory.mktemp("clip") / "clip.zarr", model="nsd-tiny-vit", layers="6",
                        pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"), progress=False)


@pytest.mark.parametrize("source", ["mindeye2", "mindeye1", "brain-diffuser"])
def test_fit_adapters_runs_on_each_source(releases, clip_cache, tmp_path, source):
    from pipeline.fitting.fit import fit_adapters

    store = prepare_release(source, releases[source], SUBJECT, tmp_path / "fmri.zarr")
    report = fit_adapters(store, clip_cache, "ridge", tmp_path / "run", progress=False)
    assert report
    with pytest.raises(UserError) as err:  # no ROI labels without --rois-from: one line
        fit_adapters(store, clip_cache, "ridge", tmp_path / "run_roi", rois=["prf-visualrois"], progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run_roi").exists()


# ---- bad input: one line, nothing written -----------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fails(tmp_path: Path, root: Path, match: str, **kw) -> None:
    out = tmp_path / "out.zarr"
    with pytest.raises(UserError, match=match) as err:
        prepare_release("mindeye2", root, SUBJECT, out, **kw)
    assert "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("*.zarr*"))


def test_mindeye2_missing_files(releases, tmp_path):
    root = _copy(releases["mindeye2"], tmp_path / "r1")
    betas_path(root, SUBJECT).unlink()
    _fails(tmp_path, root, "MindEye2 betas of subject 1 not found")
    root = _copy(releases["mindeye2"], tmp_path / "r2")
    shutil.rmtree(wds_dir(root, SUBJECT) / "new_test")
    _fails(tmp_path, root, "new_test tar not found")
    shutil.rmtree(wds_dir(root, SUBJECT))
    _fails(tmp_path, root, "webdatasets of subject 1 not found")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _rewrite_tar(tar: Path, change) -> None:
    """Rewrite ``tar`` with each member's bytes replaced by ``change(index, name, data)``."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t if m.isfile()]
    with tarfile.open(tar, "w") as t:
        for k, (m, data) in enumerate(members):
            data = change(k, m.name, data)
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))


def _rewrite_first_sample(tar: Path, behav: np.ndarray) -> None:
    _rewrite_tar(tar, lambda k, name, data: _npy_bytes(behav) if k == 0 else data)


def test_mindeye2_bad_behav_width_and_trial_past_rows(releases, tmp_path):
    root = _copy(releases["mindeye2"], tmp_path / "r1")
    _rewrite_first_sample(wds_dir(root, SUBJECT) / "train/0.tar", np.zeros((1, 16)))
    _fails(tmp_path, root, "behav.npy has 16 values, expected 17")
    root = _copy(releases["mindeye2"], tmp_path / "r2")
    with h5py.File(betas_path(root, SUBJECT), "r") as f:
        n_rows = f["betas"].shape[0]
    behav = np.zeros((1, 17))
    behav[0, 5] = n_rows
    _rewrite_first_sample(wds_dir(root, SUBJECT) / "train/0.tar", behav)
    _fails(tmp_path, root, f"global trial {n_rows} is past the betas file's {n_rows} rows")


def test_mindeye2_voxels_disagree_with_rois(releases, demo_root, tmp_path):
    root = _copy(releases["mindeye2"], tmp_path / "r1")
    with h5py.File(betas_path(root, SUBJECT), "r+") as f:
        betas = f["betas"][:, :-1]
        del f["betas"]
        f["betas"] = betas
    _fails(tmp_path, root, "nsdgeneral voxels but the release's betas have", rois_from=demo_root)


def test_release_rejects_other_normalisations(releases, tmp_path):
    for source, zscore in (("mindeye2", "session"), ("mindeye1", "train"), ("brain-diffuser", "session")):
        with pytest.raises(UserError, match="this release supports"):
            prepare_release(source, releases[source], SUBJECT, tmp_path / "x.zarr", zscore=zscore)
    with pytest.raises(UserError, match="no per-trial rows"):
        prepare_release("brain-diffuser", releases["brain-diffuser"], SUBJECT, tmp_path / "x.zarr", repeats="trials")
    assert not (tmp_path / "x.zarr").exists()


# ---- stimuli -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(demo_root):
    from pipeline.features import clip

    return clip.load_model("nsd-tiny-vit", str(demo_root / "demo/nsd-tiny-vit.safetensors"))


def _embeds(loaded, pixels) -> np.ndarray:
    import torch

    with torch.no_grad():
        return loaded.model.encode_image(pixels).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_model_size_release_images_are_only_normalised(releases, demo_root, tiny_model):
    """MindEye2's float16 images at the model's input size skip the transform (no second resize) and
    give the raw stimuli path's features within the resize tolerance."""
    from pipeline.data.releases.stimuli import open_stimuli
    from pipeline.features.pixels import input_size, to_pixels
    from pipeline.features.clip import preprocess_batch

    ids = np.arange(0, 64, 4)
    stim = open_stimuli("mindeye2", releases["mindeye2"])
    images = stim.read(ids)
    assert images.shape == (len(ids), input_size(tiny_model), input_size(tiny_model), 3)
    assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
    mean = np.array(tiny_model.preprocess.transforms[-1].mean, np.float32)
    std = np.array(tiny_model.preprocess.transforms[-1].std, np.float32)
    np.testing.assert_allclose(to_pixels(tiny_model, images).numpy(),
                               ((images - mean) / std).transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
    with NSD(demo_root).stimuli() as brick:
        raw = brick[np.sort(ids)]
    cos = _cosine(_embeds(tiny_model, to_pixels(tiny_model, images)), _embeds(tiny_model, preprocess_batch(tiny_model, raw)))
    assert cos.min() > 0.999, cos


def test_other_sizes_go_through_the_model_transform(releases, demo_root, tiny_model, tmp_path):
    from pipeline.data.releases.stimuli import open_stimuli
    from pipeline.features.pixels import to_pixels
    from pipeline.features.clip import preprocess_batch

    me1 = open_stimuli("mindeye1", releases["mindeye1"], SUBJECT)
    bd = open_stimuli("brain-diffuser", releases["brain-diffuser"], SUBJECT)
    store = zarr.open_group(str(prepare_release("brain-diffuser", releases["brain-diffuser"], SUBJECT,
                                                tmp_path / "bd.zarr")), mode="r")
    np.testing.assert_array_equal(bd.ids, np.sort(np.r_[store["train/image_ids"][...], store["test/image_ids"][...]]))
    ids = me1.ids[:12]
    with NSD(demo_root).stimuli() as brick:
        raw = brick[np.sort(ids)]
    np.testing.assert_array_equal(bd.read(ids), raw)  # Brain-Diffuser's arrays hold the native pixels
    jpgs = me1.read(ids)
    assert jpgs.shape == (len(ids), 256, 256, 3) and jpgs.dtype == np.uint8
    cos = _cosine(_embeds(tiny_model, to_pixels(tiny_model, jpgs)), _embeds(tiny_model, preprocess_batch(tiny_model, raw)))
    assert cos.min() > 0.99, cos  # 256-px JPEG q95 of the raw image
    with pytest.raises(UserError, match="no image for 73k id"):
        me1.read([int(np.setdiff1d(np.arange(600), me1.ids)[0])])


def test_zscore_train_uses_the_training_trials_of_the_sessions_used(demo_root, tmp_path):
    store = zarr.open_group(str(prepare_fmri(demo_root, SUBJECT, tmp_path / "z.zarr", sessions=2, zscore="train",
                                             repeats="trials", progress=False)), mode="r")
    train = store["train/betas"][...].astype(np.float64)
    live = train.std(0) > 0
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(0)[live], 1, atol=1e-4)
    assert store.attrs["zscore"] == "train" and store["test/betas"][...].std() > 0.5


def test_mindeye1_without_per_repetition_trials_gives_means_only(releases, demo_root, tmp_path, n_old):
    """Should the hosted tars' trial.npy hold one index per sample, averages still come out right."""
    root = _copy(releases["mindeye1"], tmp_path / "me1")
    for tar in root.glob("*/*.tar"):
        _rewrite_tar(tar, lambda k, name, data: _npy_bytes(np.load(io.BytesIO(data))[:1])
                     if name.endswith(".trial.npy") else data)
    raw = prepare_fmri(demo_root, SUBJECT, tmp_path / "raw.zarr", sessions=n_old, progress=False)
    _assert_same(prepare_release("mindeye1", root, SUBJECT, tmp_path / "mean.zarr"), raw)
    with pytest.raises(UserError, match="no per-trial rows with trial indices"):
        prepare_release("mindeye1", root, SUBJECT, tmp_path / "trials.zarr", repeats="trials")
    assert not (tmp_path / "trials.zarr").exists()


# ---- extract-clip, decode and evaluate on a release --------------------------------------------------
RELEASE_IMAGES = {"mindeye2": "all", "mindeye1": f"subject:{SUBJECT}", "brain-diffuser": f"subject:{SUBJECT}"}


@pytest.fixture(scope="module")
def release_caches(releases, demo_root, tmp_path_factory) -> dict[str, Path]:
    """extract-clip --source <release> with the settings of ``clip_cache``, once per release."""
    from pipeline.features.extract import extract_clip

    base = tmp_path_factory.mktemp("release_clip")
    return {source: extract_clip(releases[source], base / f"{source}.zarr", source=source, images=images,
                                 model="nsd-tiny-vit", layers="6", progress=False,
                                 pretrained=str(demo_root / "demo/nsd-tiny-vit.safetensors"))
            for source, images in RELEASE_IMAGES.items()}


@pytest.mark.parametrize("source", list(RELEASE_IMAGES))
def test_extract_clip_on_release_stimuli_equals_raw(releases, clip_cache, release_caches, tiny_model, source):
    """Rows are 73k ids; the release's images give the raw stimuli path's features within the resize
    tolerance: model-size floats exactly their normalised pixels, 256-px jpgs close, native arrays equal."""
    from pipeline.data.releases.stimuli import open_stimuli
    from pipeline.features.cache import filled_rows
    from pipeline.features.pixels import to_pixels

    stim = open_stimuli(source, releases[source], None if source == "mindeye2" else SUBJECT)
    got = zarr.open_group(str(release_caches[source]), mode="r")
    raw = zarr.open_group(str(clip_cache), mode="r")
    filled = np.flatnonzero(filled_rows(got))
    np.testing.assert_array_equal(filled, stim.ids)  # rows without an image are not counted as extracted
    assert not got["image_embeds"][...][np.setdiff1d(np.arange(got["image_embeds"].shape[0]), filled)].any()
    ids = filled
    ours, theirs = got["image_embeds"][...][ids], raw["image_embeds"][...][ids]
    cos = _cosine(ours, theirs)
    if source == "mindeye2":  # no second resize: exactly the normalised release pixels
        np.testing.assert_allclose(ours, _embeds(tiny_model, to_pixels(tiny_model, stim.read(ids))), atol=1e-5)
        assert cos.min() > 0.999, cos
    elif source == "mindeye1":
        assert cos.min() > 0.99, cos  # 256-px JPEG q95 of the raw image
    else:  # Brain-Diffuser's arrays hold the native pixels
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        np.testing.assert_allclose(got["layers/6"][ids], raw["layers/6"][ids], atol=2e-3)


def test_extract_clip_per_subject_release_needs_a_subject(releases, tmp_path):
    from pipeline.features.extract import extract_clip

    with pytest.raises(UserError, match="keeps its images per subject: give --images subject:N") as err:
        extract_clip(releases["mindeye1"], tmp_path / "c.zarr", source="mindeye1", model="nsd-tiny-vit", layers="6")
    assert "\n" not in str(err.value) and not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("source", ["mindeye2", "mindeye1", "brain-diffuser"])
def test_fit_decode_evaluate_on_a_release_store(releases, release_caches, tmp_path, source):
    """A release store's run decodes and evaluates on the release's own stimuli (native size), and
    metrics.json says at which size PixCorr/SSIM were computed when the release's images are not
    published at the protocol's 425 px (Brain-Diffuser's are: no note)."""
    import json

    from _builders import decoded_ridge_run
    from pipeline.data.registry import run_dataset
    from pipeline.decoding import decode
    from pipeline.evaluation.runs import evaluate_run

    store = prepare_release(source, releases[source], SUBJECT, tmp_path / "fmri.zarr")
    assert zarr.open_group(str(store), mode="r").attrs["dataset"] == source
    run = decoded_ridge_run(store, release_caches[source], releases[source], tmp_path / "run", ["image_embeds"])
    data = run_dataset([store], releases[source])
    test_ids = zarr.open_group(str(store), mode="r")["test/image_ids"][...]
    recon = decode.read_reconstructions(run / "recon", test_ids)
    with data.stimuli() as brick:
        native = brick[test_ids[:1]].shape[1]
    expected = {"mindeye2": 32, "mindeye1": 256, "brain-diffuser": 64}[source]  # the look-alikes' sizes
    assert recon.shape[1] == native == expected  # the release's own images
    out = evaluate_run(run, releases[source])
    written = json.loads((run / "metrics.json").read_text())
    if source == "brain-diffuser":
        assert "image_metrics_size" not in written
    else:
        assert written["image_metrics_size"]["PixCorr_SSIM_px"] == 425
        assert written["image_metrics_size"]["ground_truth_px"] == native
    assert 0 < out["reconstruction"]["SSIM"] <= 1
    assert "has no category labels" in written["unavailable"]["zero_shot"]


def test_release_datasets_are_registered(releases):
    from pipeline.data.registry import open_dataset

    bd = open_dataset("brain-diffuser", releases["brain-diffuser"], subjects=[SUBJECT])
    with bd.stimuli() as brick:
        ids = bd.release_stimuli.ids[:3]
        assert brick[ids].shape == (3, *brick.shape[1:]) and brick.dtype == np.uint8
    caps = np.concatenate([np.load(releases["brain-diffuser"] / f"processed_data/subj{SUBJECT:02d}/"
                                   f"nsd_{s}_cap_sub{SUBJECT}.npy") for s in ("train", "test")])
    assert set(bd.captions(ids).ravel()) <= set(caps.ravel())
    with pytest.raises(UserError, match="dataset 'mindeye1' has no captions"):
        open_dataset("mindeye1", releases["mindeye1"], subjects=[SUBJECT]).captions(ids)
    with pytest.raises(UserError, match="stores its images per subject"):
        with open_dataset("mindeye1", releases["mindeye1"]).stimuli():
            pass


def test_reading_rows_a_release_has_no_image_for_is_one_line(releases, release_caches):
    from pipeline.data.releases.stimuli import open_stimuli
    from pipeline.features.cache import fill_command, open_cache

    path = release_caches["mindeye1"]
    lacking = int(np.setdiff1d(np.arange(600), open_stimuli("mindeye1", releases["mindeye1"], SUBJECT).ids)[0])
    with pytest.raises(UserError, match=f"mindeye1 images it was extracted from have no 73k id {lacking}") as err:
        open_cache(path, rows=[lacking])
    assert "\n" not in str(err.value)
    command = fill_command(zarr.open_group(str(path), mode="r"), path, 0, 63)
    assert "--source mindeye1" in command and f"--images subject:{SUBJECT}" in command


def test_a_224_px_release_image_is_only_normalised_by_a_real_architecture():
    """ViT-B-32's own open_clip transform (224 px, OpenAI mean/std): a 224-px float image (MindEye2's
    release) is normalised with those statistics and never resized; a 256-px one goes through the
    transform's resize + crop."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from pipeline.features import clip
    from pipeline.features.pixels import input_size, to_pixels

    loaded = clip.load_model("ViT-B-32", "none")
    assert input_size(loaded) == 224
    images = np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)
    expected = (images.transpose(0, 3, 1, 2) - np.reshape(OPENAI_DATASET_MEAN, (1, 3, 1, 1))) / np.reshape(
        OPENAI_DATASET_STD, (1, 3, 1, 1))
    np.testing.assert_allclose(to_pixels(loaded, images).numpy(), expected, atol=1e-5)
    larger = np.random.default_rng(1).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    assert tuple(to_pixels(loaded, larger).shape) == (2, 3, 224, 224)
