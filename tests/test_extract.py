"""extract-clip against forward hooks, encode_image/encode_text and numpy re-computations, on the demo's
tiny open_clip ViT (6 blocks, 4x4 patches + CLS = 17 tokens, width 64); resume after kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.io
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from _builders import hooked_forward, images_of, tree
from cli import app
from pipeline.demo.nsd import DemoConfig
from pipeline.errors import UserError
from pipeline.features.cache import filled_rows, open_cache
from pipeline.features.extract import extract_clip, select_images

ROOT = Path(__file__).resolve().parents[1]
LAYERS = "2,4,6,2-4:mean"  # the demo's analogue of 8,16,24,11-20:mean
KW = dict(model="nsd-tiny-vit", layers=LAYERS, shard_rows=64, batch_size=24, progress=False)
N = DemoConfig().n_images  # 520 images -> 9 shards (the last one 8 rows); 64 = 24 + 24 + 16, so batches never cross a shard
SHARDS = -(-N // 64)



@pytest.fixture(scope="module")
def weights(demo_root) -> Path:
    return demo_root / "demo/nsd-tiny-vit.safetensors"


@pytest.fixture(scope="module")
def store_path(demo_root, weights, tmp_path_factory) -> Path:
    """The reference: one uninterrupted run over all images, with captions."""
    return extract_clip(demo_root, tmp_path_factory.mktemp("clip") / "tiny.zarr", pretrained=str(weights), **KW)


@pytest.fixture(scope="module")
def store(store_path) -> zarr.Group:
    return zarr.open_group(store_path, mode="r")


def test_tokens_embeds_and_captions_match_independent_references(demo_root, weights, store):
    rows = [0, 23, 24, 63, 64, 200, 359]  # batch and shard edges, the short last shard
    loaded, blocks, embeds = hooked_forward(weights, images_of(demo_root, rows))
    assert blocks[2].shape == (len(rows), 17, 64)  # batch-first (B, 1 + 16 patches, width)
    for k in (2, 4, 6):  # CLS first, then patches: exactly what the block returned
        np.testing.assert_allclose(store[f"layers/{k}"][rows], blocks[k].astype(np.float16), rtol=2e-3, atol=2e-3)
    mean = np.mean([blocks[k] for k in (2, 3, 4)], axis=0)
    np.testing.assert_allclose(store["layers/2-4_mean"][rows], mean.astype(np.float16), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store["image_embeds"][rows], embeds, rtol=1e-5, atol=1e-5)

    # captions looked up by hand: stim info row -> cocoId/cocoSplit -> COCO captions json
    import pandas as pd

    info = pd.read_csv(demo_root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv", index_col=0)
    row = 200
    split = info.loc[row, "cocoSplit"]
    anns = json.loads((demo_root / f"nsddata_stimuli/stimuli/nsd/annotations/captions_{split}.json").read_text())
    texts = [a["caption"].strip() for a in anns["annotations"] if a["image_id"] == info.loc[row, "cocoId"]][:5]
    with torch.no_grad():
        ref = loaded.model.encode_text(open_clip.get_tokenizer("nsd-tiny-vit")(texts)).numpy()
    np.testing.assert_allclose(store["text_embeds"][row], ref, rtol=1e-5, atol=1e-5)

    assert store["layers/2"].dtype == np.float16 and store["image_embeds"].dtype == np.float32
    assert store["text_embeds"].shape == (N, 5, 32)
    arr = store["layers/6"]
    assert arr.shards == (64, 17, 64) and 64 % arr.chunks[0] == 0
    attrs = dict(store.attrs)
    assert attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert attrs["layers"]["2-4_mean"] == {"blocks": [2, 3, 4], "aggregate": "mean", "projected": False}
    assert attrs["activation"] == "gelu" and attrs["open_clip_model"] == "nsd-tiny-vit"
    assert attrs["N"] == N and attrs["tokens"] == "all" and attrs["compute_dtype"] == "float32"
    assert attrs["preprocessing"]["size"] == [32, 32] and attrs["source"]["n_images"] == N
    assert filled_rows(store).all()


def test_token_modes_and_image_subsets(demo_root, weights, store, tmp_path):
    full = store["layers/4"][0:64].astype(np.float32)  # (64, 17, 64): CLS + 4x4 patches
    patches = full[:, 1:].reshape(64, 4, 4, 64)
    expected = {
        "cls": full[:, :1],
        "mean": full[:, 1:].mean(1, keepdims=True),
        "grid:2": np.concatenate(
            [full[:, :1], patches.reshape(64, 2, 2, 2, 2, 64).mean((2, 4)).reshape(64, 4, 64)], axis=1
        ),
    }
    for mode, want in expected.items():
        out = extract_clip(demo_root, tmp_path / f"{mode}.zarr", pretrained=str(weights), tokens=mode,
                           images="10-20", captions=False, **KW)
        g = zarr.open_group(out, mode="r")
        got = g["layers/4"]
        assert got.shape == (N, want.shape[1], 64)
        np.testing.assert_allclose(got[0:64], want, rtol=1e-2, atol=1e-2)  # float16 rounding of both
        # ids 10..20 -> shard 0 filled whole; every other row untouched (0) and marked unfilled
        np.testing.assert_array_equal(filled_rows(g), np.arange(N) < 64)
        assert not got[64:].any() and "text_embeds" not in g and g.attrs["tokens"] == mode
    with pytest.raises(UserError, match="not extracted yet"):
        open_cache(tmp_path / "cls.zarr")
    assert open_cache(tmp_path / "cls.zarr", rows=[0, 63]) is not None


def test_images_selection_follows_expdesign(demo_root):
    from pipeline.data.nsd import NSD

    mat = scipy.io.loadmat(demo_root / "nsddata/experiments/nsd/nsd_expdesign.mat")
    nsd = NSD(demo_root)
    np.testing.assert_array_equal(select_images("shared", N, nsd), np.sort(mat["sharedix"].ravel() - 1))
    np.testing.assert_array_equal(select_images("subject:2", N, nsd), np.unique(mat["subjectim"][1] - 1))
    np.testing.assert_array_equal(select_images("5-9", N, nsd), np.arange(5, 10))
    with pytest.raises(UserError, match="needs nsd_expdesign.mat"):
        select_images("shared", N, None)


def test_local_checkpoint_files_load(demo_root, weights, store, tmp_path):
    state = load_file(str(weights))
    for name, obj in (("plain.pt", state), ("wrapped.pt", {"state_dict": state}), ("copy.safetensors", None)):
        ckpt = tmp_path / name
        if obj is None:
            ckpt.write_bytes(weights.read_bytes())
        else:
            torch.save(obj, ckpt)
        out = extract_clip(demo_root, tmp_path / f"{name}.zarr", pretrained=str(ckpt), images="0-63",
                           loader_workers=1, **KW)  # also runs the background loader process
        g = zarr.open_group(out, mode="r")
        for arr in ("layers/2", "layers/2-4_mean", "image_embeds", "text_embeds"):
            np.testing.assert_array_equal(g[arr][0:64], store[arr][0:64])
        assert g.attrs["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert g.attrs["pretrained"] == str(ckpt)


KILL_AT_WRITE = """
import json, os, signal, sys, torch, zarr
from pipeline.features.extract import extract_clip
torch.set_num_threads(1)
limit, calls, original = int(sys.argv[1]), [0], zarr.Array.__setitem__
def setitem(self, key, value):  # kill -9 this process at its limit-th array write
    calls[0] += 1
    if calls[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, key, value)
zarr.Array.__setitem__ = setitem
extract_clip(sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
"""


def test_resume_after_kill_9_is_bit_identical_and_skips_done_shards(demo_root, weights, store_path, tmp_path, monkeypatch):
    out = tmp_path / "killed.zarr"
    kw = {**KW, "pretrained": str(weights)}
    # a shard is 7 writes: 4 layers, image_embeds, text_embeds, then its shard_done flag
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_WRITE, str(7 * 2 + 3), str(demo_root), str(out), json.dumps(kw)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr  # shards 0, 1 complete; shard 2 half written, unflagged
    g = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(g["shard_done"][:], np.arange(SHARDS) < 2)
    shard1 = out / "layers/4/c/1/0/0"
    stamp = shard1.stat().st_ino, shard1.stat().st_mtime_ns

    calls, original = [0], zarr.Array.__setitem__

    def interrupt(self, key, value):  # Ctrl-C just before shard 3's flag
        calls[0] += 1
        if calls[0] == 7 * 2:
            raise KeyboardInterrupt
        original(self, key, value)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(zarr.Array, "__setitem__", interrupt)
        extract_clip(demo_root, out, **kw)
    np.testing.assert_array_equal(g["shard_done"][:], np.arange(SHARDS) < 3)
    # a torn shard object and a stray temp file, as an interrupted atomic write leaves them
    torn = out / "layers/2/c/3/0/0"
    torn.write_bytes(torn.read_bytes()[:100])
    (torn.parent / "0.0123abcd.partial").write_bytes(b"x")

    extract_clip(demo_root, out, **kw)
    assert tree(out) == tree(store_path)  # every file, byte for byte
    assert (shard1.stat().st_ino, shard1.stat().st_mtime_ns) == stamp  # shard 1 never rewritten


def test_other_settings_refused_same_settings_resume(demo_root, weights, store_path, tmp_path):
    before = tree(store_path)
    with pytest.raises(UserError, match=r"other settings \(layers: .*--overwrite"):
        extract_clip(demo_root, store_path, pretrained=str(weights), **{**KW, "layers": "2,4"})
    lines = []
    extract_clip(demo_root, store_path, pretrained=str(weights), report=lines.append, **KW)
    assert f"{SHARDS} of {SHARDS} requested shards already done, writing 0" in lines[0]
    assert tree(store_path) == before  # neither call changed a byte

    small = tmp_path / "small.zarr"
    extract_clip(demo_root, small, pretrained=str(weights), images="0-9", captions=False, **KW)
    extract_clip(demo_root, small, pretrained=str(weights), images="0-9", captions=False, overwrite=True,
                 **{**KW, "layers": "6"})
    assert list(zarr.open_group(small, mode="r")["layers"].keys()) == ["6"]


def test_two_dask_workers_write_disjoint_shards_and_lose_nothing(demo_root, weights, store, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        out = extract_clip(demo_root, tmp_path / "dask.zarr", pretrained=str(weights), device="cpu",
                           scheduler=cluster.scheduler_address, loader_workers=0, **KW)
    g = zarr.open_group(out, mode="r")
    assert g["shard_done"][:].all()
    for name in ("layers/2", "layers/4", "layers/6", "layers/2-4_mean", "image_embeds", "text_embeds"):
        np.testing.assert_array_equal(g[name][:], store[name][:])


Case = namedtuple("Case", "args message")
BAD = [
    Case(["--stimuli", "{tmp}/nowhere.hdf5"], "--stimuli: not found"),
    Case(["--layers", "2,7"], "out of range; this model has blocks 1..6"),
    Case(["--layers", "3-9:mean"], "blocks 1..6"),
    Case(["--tokens", "patches"], "--tokens must be all, cls, mean, grid:K or merge:K"),
    Case(["--tokens", "grid:5"], "finer than the model's (4, 4) patch grid"),
    Case(["--tokens", "merge:16"], "merge:16 must merge into fewer than the model's 16 patches"),
    Case(["--layers", "2-4:proj"], "cannot parse '2-4:proj'"),
    Case(["--images", "subject:9"], f"subjects are 1..{max(DemoConfig().subjects)}"),
    Case(["--images", f"300-{N + 40}"], f"need A <= B < {N}"),
    Case(["--images", "odd"], "--images must be all, shared, subject:N or A-B"),
    Case(["--dtype", "int8"], "--dtype must be one of"),
    Case(["--pretrained", "{tmp}/missing.pt"], "checkpoint file not found"),
    Case(["--chunk-rows", "5"], "must be >= 1 and divide --shard-rows 64"),
]


@pytest.mark.parametrize("case", BAD, ids=[" ".join(c.args) for c in BAD])
def test_bad_inputs_fail_with_one_clear_line(demo_root, weights, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: only the options below count
    args = ["extract-clip", "--stimuli", str(demo_root), "--out", str(tmp_path / "x.zarr"), "--model",
            "nsd-tiny-vit", "--pretrained", str(weights), "--layers", LAYERS, "--shard-rows", "64"]
    args += [a.format(tmp=tmp_path) for a in case.args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert case.message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "x.zarr").exists()


def test_disk_too_small_fails_before_writing(demo_root, weights, tmp_path, monkeypatch):
    import pipeline.store as store

    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: namedtuple("Usage", "total used free")(1e9, 1e9, 10_000))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "extract-clip", "--stimuli", str(demo_root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"),
        "--out", str(tmp_path / "x.zarr"), "--model", str(ROOT / "pipeline/model_configs/nsd-tiny-vit.json"),
        "--pretrained", str(weights), "--layers", "6",
    ])
    assert result.exit_code == 1
    assert re.search(r"writes up to 1\.\d MB \(uncompressed\) but only 10\.0 kB is free", result.output), result.output
    assert not (tmp_path / "x.zarr").exists()


def test_cli_writes_the_default_store_name(demo_root, weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "extract-clip", "--stimuli", str(demo_root), "--model", "nsd-tiny-vit", "--pretrained", str(weights),
        "--layers", "6", "--tokens", "cls", "--images", "0-9", "--shard-rows", "16",
    ])
    assert result.exit_code == 0, result.output
    out = tmp_path / "cache/clip/nsd-tiny-vit__nsd-tiny-vit.zarr"
    assert "0 of 1 requested shards already done, writing 1 (" in result.output
    assert filled_rows(zarr.open_group(out, mode="r"))[:16].all()
