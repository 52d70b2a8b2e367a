"""Every script in benchmarks/ runs at tiny sizes and calls public pipeline names only, so a figure
in the README can always be reproduced by its command (issue 21, section 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _imports import private_names

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
HELPERS = {"report.py"}  # imported by the scripts, not run

# script -> (tiny arguments, top-level keys its JSON must have, slow). Add a row for each new script.
SMOKE: dict[str, tuple[list[str], set[str], bool]] = {
    "analyze_layers.py": (["--voxels", "64", "--n-train", "40", "--n-test", "10", "--width", "8", "--layers", "2",
                           "--measure-layers", "1", "--threads", "1"], {"measured", "extrapolated", "sizes"}, False),
    "evaluate.py": (["--images", "4", "--size", "64", "--networks", "none", "--batch-size", "4", "--device", "cpu",
                     "--threads", "1"], {"metrics_computed", "seconds", "peak_rss_bytes"}, False),
    "extract.py": (["--model", "nsd-tiny-vit", "--layers", "2,6", "--images", "4", "--batch-size", "2",
                    "--shard-rows", "2", "--device", "cpu", "--tv-python", "/nonexistent/python"],
                   {"forward_images_per_s", "extract_clip_images_per_s", "thingsvision"}, False),
    "gpu_check.py": (["--device", "cpu", "--quick"], {"parts", "ok", "seconds"}, True),
    "merge.py": (["--seeds", "1", "--epochs", "1"], {"modes", "winner"}, True),
    "reads.py": (["--rows", "2048", "--wanted", "64", "--tokens", "4", "--channels", "4", "--shard-rows", "256",
                  "--baseline-rows", "3"], {"layout", "scattered", "consecutive", "old_reader"}, False),
    "rehearsal.py": (["--trials", "120", "--images", "40", "--small-models"], {"stages", "total_wall_s"}, True),
    "ridge.py": (["--n-train", "40", "--n-test", "10", "--voxels", "30", "--tokens", "2", "--channels", "4",
                  "--ref-columns", "8", "--alphas", "3", "--folds", "2", "--threads", "1"],
                 {"problem", "solvers", "agreement"}, False),
    "subjects.py": (["--seeds", "0", "--epochs", "1", "--finetune-epochs", "1", "--modes", "all"],
                    {"runs", "seconds"}, True),
    "train.py": (["--small", "--images", "64", "--repeats", "2", "--batch-size", "8", "--steps", "2",
                  "--clip-steps", "1", "--threads", "1"], {"variants", "speedup_vs_clip_every_step"}, False),
    "unclip_small.py": ([], set(), False),  # builds a folder (OUT --tiny, below) and prints its path
    "video_decode.py": (["--arch", "tiny", "--size", "32", "--frames", "2", "--steps", "2", "--strength", "0.5",
                         "--full-steps", "2", "--device", "cpu", "--threads", "1"],
                        {"diffusion", "interpolate_seconds_per_clip", "estimate_seconds_per_clip"}, False),
}
OUT_FLAG = {"merge.py": "--json", "ridge.py": "--json", "subjects.py": None, "reads.py": None}  # default --out
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)


def test_private_name_check_sees_both_forms(tmp_path: Path) -> None:
    script = tmp_path / "b.py"
    script.write_text("from pipeline.fitting.train import _train_epoch, train\nfrom pipeline.evaluation import metrics as M\n"
                      "M._EncodeImage\nimport pipeline.store\npipeline.store._zarr_rows\nM.evaluate\n")
    assert private_names(script) == ["line 1: from pipeline.fitting.train import _train_epoch",
                                     "line 3: M._EncodeImage", "line 5: pipeline.store._zarr_rows"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_uses_public_names_only(script: str) -> None:
    assert private_names(BENCHMARKS / script) == [], f"{script} reaches into pipeline's private names"


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_has_smoke_arguments(script: str) -> None:
    assert script in SMOKE, f"benchmarks/{script} has no tiny arguments: add a row to SMOKE in {Path(__file__).name}"


def _run(script: str, args: list[str]) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _smoke(script: str, tmp_path: Path) -> None:
    args, keys, _ = SMOKE[script]
    if script == "unclip_small.py":
        folder = Path(_run(script, [str(tmp_path / "unclip"), "--tiny"]).strip().splitlines()[-1])
        assert (folder / "model_index.json").is_file()
        return
    out, flag = tmp_path / "result.json", OUT_FLAG.get(script, "--out")
    stdout = _run(script, args + ([flag, str(out)] if flag else []))
    printed = json.loads(stdout[stdout.index("{"):])  # the JSON object is the last thing printed
    assert keys <= set(printed), f"{script}: missing {sorted(keys - set(printed))}"
    if flag:
        assert json.loads(out.read_text()) == printed
    if script == "gpu_check.py":
        assert {k: v["error"] for k, v in printed["parts"].items() if not v["ok"]} == {}


@pytest.mark.parametrize("script", [s for s in SMOKE if not SMOKE[s][2]])
def test_benchmark_smoke(script: str, tmp_path: Path) -> None:
    if not (BENCHMARKS / script).is_file():
        pytest.skip(f"benchmarks/{script} is not in this tree")
    _smoke(script, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in SMOKE if SMOKE[s][2]])
def test_benchmark_smoke_slow(script: str, tmp_path: Path) -> None:
    _smoke(script, tmp_path)


def test_analyze_layers_benchmark_flatten_with_its_direct_baseline(tmp_path: Path) -> None:
    args = SMOKE["analyze_layers.py"][0] + ["--features", "flatten", "--tokens", "3", "--baseline"]
    stdout = _run("analyze_layers.py", args)
    printed = json.loads(stdout[stdout.index("{"):])
    assert printed["sizes"]["features"].startswith("flatten") and printed["sizes"]["tokens"] == 3
    assert printed["measured"]["peak_rss_gb"] > 0 and printed["direct_baseline"]["peak_rss_gb"] > 0
