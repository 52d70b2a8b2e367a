"""Several subjects, one model: per-subject outputs, exact reload, what fine-tuning freezes, missing
ROIs, --drop-rois, bad input, and torchrun (two gloo processes) against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.numpy import load_file
from typer.testing import CliRunner

from cli import app
from pipeline.decoding.run import decode_run
from pipeline.errors import UserError
from pipeline.evaluation.runs import evaluate_run
from pipeline.fitting.adapters.subjects import SubjectAdapter
from pipeline.fitting.cohort import MultiSubjectDataset
from pipeline.fitting.fit import fit_adapters
from pipeline.fitting.models import load_adapter, predict

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["layers/2-4_mean", "image_embeds"]
MCLIP = {"width": 32, "depth": 1, "token_rank": 4, "dropout": 0.0}
TRAIN = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "patience": None, "val_fraction": 0.0}
SUBJ = {"width": 16, "roi_width": 4}


@pytest.fixture(scope="module")
def stores(demo_fmri, demo_clip) -> dict:
    out = {s: demo_fmri(subject=s) for s in (1, 2, 7)}
    out["7_1sess"] = demo_fmri(subject=7, train_sessions=1)
    out["clip"] = demo_clip()
    return out


def _fit(stores_list, clip, out, **kw) -> dict:
    kw.setdefault("params", MCLIP)
    kw.setdefault("subjects", SUBJ)
    return fit_adapters(stores_list, clip, "mclip", out, targets=TARGETS, train={**TRAIN, **kw.pop("train", {})},
                        progress=False, **kw)


@pytest.fixture(scope="module")
def pretrained(stores, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pre") / "shared"
    _fit([stores[1], stores[2]], stores["clip"], run, align="voxels")
    return run


def test_train_sessions_keeps_every_test_image(stores):
    one, full = (zarr.open_group(stores[k], mode="r") for k in ("7_1sess", 7))
    np.testing.assert_array_equal(one["test/image_ids"][:], full["test/image_ids"][:])
    assert 0 < one["train/betas"].shape[0] < full["train/betas"].shape[0]
    assert one.attrs["train_sessions"] == [1] and full.attrs["sessions"] == [1, 2, 3, 4, 5]


def test_batches_mix_subjects_over_one_bank(stores):
    groups = {s: zarr.open_group(stores[s], mode="r") for s in (1, 2)}
    clip = zarr.open_group(stores["clip"], mode="r")
    data = MultiSubjectDataset.from_stores(groups, clip, TARGETS)
    n1, n2 = (g["train/betas"].shape for g in groups.values())
    assert n1[1] != n2[1] and len(data) == n1[0] + n2[0]
    batch = data.__getitems__(np.arange(len(data))[::7])
    for row, s, i in zip(batch["x"], batch["subject"].tolist(), np.arange(len(data))[::7]):
        g = groups[s]
        local = i if s == 1 else i - n1[0]
        np.testing.assert_array_equal(row[: g["train/betas"].shape[1]].numpy(), g["train/betas"][local])
        assert not row[g["train/betas"].shape[1]:].any()
    ids = batch["image_id"].numpy()
    np.testing.assert_allclose(batch["targets"]["image_embeds"].numpy(), clip["image_embeds"][:][ids], rtol=1e-6)
    assert len(data.bank.images) == len(np.unique(data.image_ids))  # each image once, shared by both subjects


def test_two_subject_run_predicts_each_store_and_reloads_exactly(stores, pretrained):
    preds = zarr.open_group(pretrained / "predictions.zarr", mode="r")
    assert preds.attrs["subjects"] == ["subj01", "subj02"]
    model = load_adapter(pretrained / "adapters/mclip")
    assert isinstance(model, SubjectAdapter) and model.subjects == ["subj01", "subj02"]
    for s in (1, 2):
        g = zarr.open_group(stores[s], mode="r")
        key = f"subj{s:02d}"
        np.testing.assert_array_equal(preds[f"{key}/test/image_ids"][:], g["test/image_ids"][:])
        again = predict(model, g["test/betas"][:], subject=s)
        for t in TARGETS:
            np.testing.assert_array_equal(again[t], preds[f"{key}/test/{t}"][:])
    info = json.loads((pretrained / "run.json").read_text())
    report = json.loads((pretrained / "fit_report.json").read_text())
    assert info["subjects"] == [1, 2] and info["trained"][0]["stage"] == "pretrain"
    counts = info["parameter_counts"]
    g = zarr.open_group(stores[1], mode="r")
    n_floc = int(np.any([g[f"voxels/{f}"][:] > 0 for f in ("floc-faces", "floc-bodies", "floc-places", "floc-words")], 0).sum())
    n_all = g["train/betas"].shape[1]  # one Linear(voxels of the group -> 16) per trunk group: detail (all), semantic (floc)
    assert counts["input:subj01"] == (n_all + 1) * 16 + (n_floc + 1) * 16
    assert info["n_params"] == sum(v for v in counts.values() if isinstance(v, int))
    r = [report["subjects"][k]["targets"]["image_embeds"]["pearson_r"] for k in ("subj01", "subj02")]
    assert report["targets"]["image_embeds"]["pearson_r"] == pytest.approx(np.mean(r))
    assert not list(pretrained.parent.glob("shared.*"))


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "adapters/mclip/adapter.safetensors"))


@pytest.mark.parametrize("mode", ["all", "lora", "skip-lora"])
def test_finetuning_trains_exactly_what_its_mode_says(stores, pretrained, tmp_path, mode):
    run = tmp_path / mode
    _fit([stores["7_1sess"]], stores["clip"], run, init=pretrained, finetune=mode, subjects={"lora_rank": 2})
    before, after = _weights(pretrained), _weights(run)
    info = json.loads((run / "run.json").read_text())
    assert info["finetune"] == {"mode": mode, "rank": 2, "subject": "subj07"} and info["init_subjects"] == [1, 2]
    new = [k for k in after if k.startswith("inputs.subj07.maps")]
    assert new and all(k not in before for k in new)
    for k, v in before.items():  # the other subjects' input layers, target statistics and voxel indices stay
        if k.startswith("inputs.") or "scalers" in k or "voxels_" in k:
            np.testing.assert_array_equal(after[k], v, err_msg=k)
    # where each pre-trained trunk weight sits in the fine-tuned structure (peft and Skip-LoRA wrap the same modules)
    from pipeline.fitting.adapters.finetune import apply_finetune

    model = load_adapter(pretrained / "adapters/mclip")
    old = {id(m): n for n, m in model.trunk.named_modules() if isinstance(m, torch.nn.Linear)}
    if mode != "all":
        apply_finetune(model, mode, 2, "subj07")
    moved = {old[id(m)]: n for n, m in model.trunk.named_modules() if id(m) in old}
    changed = [not np.array_equal(before[f"trunk.{a}.weight"], after[f"trunk.{b}.weight"]) for a, b in moved.items()]
    if mode == "all":
        assert any(changed) and not any("lora_" in k for k in after)
    else:
        assert not any(changed)  # every pre-trained Linear is frozen
        lora = [k for k in after if "lora_B" in k]
        assert len(lora) == len(old) and any(np.abs(after[k]).sum() > 0 for k in lora)  # B starts at 0, trained
        skip = [k for k in after if "skip_up" in k]
        assert bool(skip) == (mode == "skip-lora") and all(np.abs(after[k]).sum() > 0 for k in skip)
    trainable = info["trained"][0]["trainable"]
    model = load_adapter(run / "adapters/mclip")
    counts = model.parameter_counts()
    expected = counts["input:subj07"] + (counts.get("lora", 0) + counts.get("skip_lora", 0) if mode != "all"
                                         else counts["trunk"] + counts["missing"])
    assert trainable == expected < info["trained"][0]["total"]
    g = zarr.open_group(stores["7_1sess"], mode="r")
    preds = zarr.open_group(run / "predictions.zarr", mode="r")
    again = predict(model, g["test/betas"][:], subject=7)
    np.testing.assert_array_equal(again["image_embeds"], preds["subj07/test/image_embeds"][:])


def test_finetuning_depends_on_its_seed_not_the_process_rng(stores, pretrained, tmp_path):
    """torch seeds its global RNG differently in every process: the fresh input layer and the LoRA A
    matrices must come from --seed, or two clones' `dvc repro` write different fine-tuned runs."""
    runs = []
    for i, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        runs.append(tmp_path / f"run{i}")
        _fit([stores["7_1sess"]], stores["clip"], runs[-1], init=pretrained, finetune="skip-lora", subjects={"lora_rank": 2})
    first, second = _weights(runs[0]), _weights(runs[1])
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_lora_layers_are_peft_and_compute_w_plus_ba(pretrained):
    from peft.tuners.lora import Linear as LoraLinear

    from pipeline.fitting.adapters.finetune import apply_finetune

    model = load_adapter(pretrained / "adapters/mclip")
    apply_finetune(model, "lora", 3, "subj01")
    layer = model.trunk.head_semantic
    assert isinstance(layer, LoraLinear)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + x @ a.T @ b.T  # alpha = r: scale 1
    torch.testing.assert_close(layer(x), expected)


def test_subject_without_floc_labels_trains_and_predicts(stores, tmp_path):
    store = tmp_path / "subj02_nofloc.zarr"
    shutil.copytree(stores[2], store)
    for name in ("floc-faces", "floc-bodies", "floc-places", "floc-words"):
        shutil.rmtree(store / "voxels" / name)
    run = tmp_path / "run"
    report = _fit([stores[1], store], stores["clip"], run, align="roi", subjects={**SUBJ, "roi_dropout": 0.2})
    info = json.loads((run / "run.json").read_text())
    assert report["subjects"]["subj02"]["n_test"] > 0 and info["align"] == "roi"
    model = load_adapter(run / "adapters/mclip")
    floc_units = [u.name for u in model.units if u.rois and u.rois[0].startswith("floc")]
    assert floc_units and not set(floc_units) & set(model.inputs["subj02"].sizes)  # missing tokens stand in
    assert set(floc_units) & set(model.inputs["subj01"].sizes)  # labels without voxels in a subject are missing too
    preds = zarr.open_group(run / "predictions.zarr", mode="r")
    assert np.isfinite(preds["subj02/test/image_embeds"][:]).all()


def test_evaluate_drop_rois_writes_its_entries(stores, pretrained, demo_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    decode_run(run, demo_root)
    assert sorted(p.name for p in (run / "recon").iterdir()) == ["subj01", "subj02"]
    out = evaluate_run(run, demo_root, drop_rois=["floc", "prf-visualrois"])
    assert set(out["subjects"]) == {"subj01", "subj02"}
    assert out["reconstruction"]["SSIM"] == pytest.approx(np.mean([out["subjects"][k]["reconstruction"]["SSIM"]
                                                                    for k in out["subjects"]]))
    g = zarr.open_group(stores[1], mode="r")
    floc = np.any([g[f"voxels/{f}"][:] > 0 for f in ("floc-faces", "floc-bodies", "floc-places", "floc-words")], 0)
    drop = out["drop_rois"]["floc"]
    assert drop["subjects"]["subj01"]["dropped_voxels"] == int(floc.sum())
    # an independent re-prediction with those voxels zeroed and the semantic group's missing token
    model = load_adapter(run / "adapters/mclip")
    pred = predict(model, g["test/betas"][:] * ~floc, subject=1, keep=~floc)["image_embeds"]
    from pipeline.fitting.run_folder import target_report

    clip = zarr.open_group(stores["clip"], mode="r")
    ref = target_report(pred, clip["image_embeds"][:][g["test/image_ids"][:]])
    assert drop["subjects"]["subj01"]["targets"]["image_embeds"]["pearson_r"] == pytest.approx(ref["pearson_r"])
    assert drop["targets"]["image_embeds"]["pearson_r"] < out["targets"]["image_embeds"]["pearson_r"]
    assert json.loads((run / "metrics.json").read_text())["drop_rois"].keys() == {"floc", "prf-visualrois"}
    with pytest.raises(UserError, match="no ROI 'hippocampus'"):
        evaluate_run(run, demo_root, drop_rois=["hippocampus"])


def _cli(*args: str):
    return CliRunner().invoke(app, ["fit-adapters", *args])


def test_bad_input_is_one_line_and_leaves_no_run(stores, pretrained, demo_fmri, demo_clip, tmp_path):
    clip = str(stores["clip"])
    other = demo_fmri(subject=2, repeats="trials")
    nozs = demo_fmri(subject=7, zscore="none", train_sessions=1)
    cases = [
        ([f"{stores[1]},{stores[1]}"], "subject 1 is given twice"),
        ([f"{stores[1]},{other}"], "was made with repeats='trials'"),
        ([str(stores["7_1sess"]), "--finetune", "lora"], "--finetune needs --init"),
        ([str(nozs), "--init", str(pretrained)], "zscore"),
        ([str(stores["7_1sess"]), "--init", str(pretrained), "--targets", "layers/6,image_embeds"], "predicts"),
        ([str(stores["7_1sess"]), "--init", str(tmp_path)], "no run.json"),
    ]
    for i, (fmri, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        result = _cli("--fmri", fmri[0], *fmri[1:], "--clip", clip, "--method", "mclip", "--out", str(out),
                      *([] if "--targets" in fmri else ["--targets", ",".join(TARGETS)]), "--epochs", "1")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert message in lines[0], lines[0]
        assert not out.exists() and not list(tmp_path.glob(f"run{i}.*"))
    other_clip = demo_clip(tokens="cls")
    with pytest.raises(UserError, match="another CLIP cache"):
        _fit([stores["7_1sess"]], other_clip, tmp_path / "x", init=pretrained)
    assert not (tmp_path / "x").exists()


DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pipeline.fitting.fit import fit_adapters
fit_adapters(sys.argv[1].split(","), sys.argv[2], "mclip", sys.argv[3], targets={targets}, params={params},
             train={train}, subjects={subjects}, align="voxels", progress=False)
"""


def test_torchrun_two_gloo_processes_equal_one_process(stores, tmp_path):
    train = {**TRAIN, "batch_size": 16, "epochs": 2, "val_fraction": 0.1}
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT.format(targets=TARGETS, params=MCLIP, train=train, subjects=SUBJ))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    fmri = f"{stores[1]},{stores[2]}"
    subprocess.run([sys.executable, str(script), fmri, str(stores["clip"]), str(tmp_path / "one")],
                   cwd=ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                    str(script), fmri, str(stores["clip"]), str(tmp_path / "two")], cwd=ROOT, env=env, check=True)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # summation order differs; Adam scales a near-zero gradient's float noise up to ~lr per step
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4, err_msg=k)
    info = json.loads((tmp_path / "two/run.json").read_text())
    assert info["trained"][0]["processes"] == 2
    pa, pb = (zarr.open_group(tmp_path / r / "predictions.zarr", mode="r") for r in ("one", "two"))
    np.testing.assert_allclose(pa["subj02/test/image_embeds"][:], pb["subj02/test/image_embeds"][:], rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob("two.*"))


SLOW_REPORT_SCRIPT = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from pipeline.fitting import fit, fit_subjects

rank, log = int(os.environ["RANK"]), {{}}

def slow(write):  # process 0's report takes long; record whether any collective is still possible
    def wrapped(*args, **kwargs):
        log.setdefault("in_group", []).append(dist.is_initialized())
        time.sleep(4)
        log.setdefault("report_done", []).append(time.time())
        return write(*args, **kwargs)
    return wrapped

fit.write_outputs = slow(fit.write_outputs)
fit_subjects.write_subject_outputs = slow(fit_subjects.write_subject_outputs)
stores, clip, out, mode = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
kw = dict(targets={targets}, params={params}, train={train}, progress=False)
if mode == "single":
    fit.fit_adapters(stores[0], clip, "mclip", out + "/single", **kw)
else:
    fit.fit_adapters(stores, clip, "mclip", out + "/multi", subjects={subjects}, align="voxels", **kw)
log["exit"] = time.time()
open(f"{{out}}/{{mode}}_rank{{rank}}.json", "w").write(json.dumps(log))
"""


def test_torchrun_others_leave_while_process_0_writes_the_report(stores, tmp_path):
    """Every process leaves the group after training: process 0's long report (NCCL would time out a
    barrier after 10 min) blocks nobody, and the run folders still land complete."""
    train = {**TRAIN, "batch_size": 16, "epochs": 1, "val_fraction": 0.1}
    script = tmp_path / "fit.py"
    script.write_text(SLOW_REPORT_SCRIPT.format(targets=TARGETS, params=MCLIP, train=train, subjects=SUBJ))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for port, run in ((29519, "single"), (29521, "multi")):  # one fit per launch, as fit-adapters runs
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(port), str(script), f"{stores[1]},{stores[2]}", str(stores["clip"]), str(tmp_path), run],
                       cwd=ROOT, env=env, check=True, timeout=300)
        r0, r1 = (json.loads((tmp_path / f"{run}_rank{r}.json").read_text()) for r in (0, 1))
        assert r0["in_group"] == [False] and "in_group" not in r1
        assert r1["exit"] < r0["report_done"][-1]  # process 1 was done before process 0's report
        assert (tmp_path / run / "run.json").is_file() and not list(tmp_path.glob(f"{run}.*"))


def test_brain_experts_second_stage_and_litemind_trunk(stores, tmp_path):
    run = tmp_path / "experts"
    _fit([stores[1], stores[2]], stores["clip"], run, experts=2, subjects={**SUBJ, "expert_hidden": 8, "expert_epochs": 2})
    info = json.loads((run / "run.json").read_text())
    pre, second = info["trained"]
    model = load_adapter(run / "adapters/mclip")
    assert (pre["stage"], second["stage"]) == ("pretrain", "experts")
    assert second["trainable"] == info["parameter_counts"]["experts"] == sum(p.numel() for p in model.experts.parameters())
    assert pre["trainable"] == info["n_params"] - info["parameter_counts"]["experts"]
    gates = {k: torch.softmax(v.detach(), 0) for k, v in model.experts.gates.items()}
    assert not torch.allclose(gates["subj01"], gates["subj02"])  # subject-conditioned
    lite = {"targets": TARGETS, "patch_size": 4, "dims": [16, 17], "depths": [1, 1], "mlp_ratio": 2.0,
            "drop_path": 0.0, "dropout": 0.0, "temperature": 0.05}
    report = fit_adapters([stores[1], stores[2]], stores["clip"], "litemind", tmp_path / "lite", params=lite,
                          train=TRAIN, subjects=SUBJ, align="roi", progress=False)
    assert set(report["subjects"]) == {"subj01", "subj02"} and np.isfinite(report["targets"]["image_embeds"]["pearson_r"])
