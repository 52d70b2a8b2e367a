"""Stage settings: the one precedence (CLI > experiment > section > defaults), typed fit settings, and
execution settings kept out of the DVC params (changing the device or the batch size reruns nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.features.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED
from stages.settings import EXECUTION, EXECUTION_KEYS, apply_preset, first, given, layered, resolve
from stages.specs import fit_spec

ROOT = Path(__file__).resolve().parents[1]


def test_settings_resolve_without_typer():
    code = "import sys, stages.settings, stages.specs; assert 'typer' not in sys.modules, 'typer imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_precedence_highest_level_that_gives_a_value_wins():
    cli, exp, sec, default = {"a": None, "b": 0}, {"a": 2, "c": False}, {"a": 3, "b": 5, "d": None}, {"e": 1}
    assert layered(given(cli), exp, sec, default) == {"a": 2, "b": 0, "c": False, "d": None, "e": 1}
    assert layered(given(cli), exp, sec, keys=["a", "z"]) == {"a": 2}
    assert first(None, 0, 5) == 0 and first(None, None) is None


def _params(tmp_path, monkeypatch, data: dict) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)


FIT = {
    "fit_adapters": {
        "fmri": "f.zarr", "clip": "c.zarr", "seed": 3,
        "subjects": {"width": 8, "experts": 0},
        "mclip": {"width": 4, "train": {"epochs": 5, "patience": None}},
        "experiments": {"x": {"method": "mclip", "experts": 2, "fmri": ["a.zarr", "b.zarr"], "train": {"lr": 0.1}}},
    },
    EXECUTION: {"fit_adapters": {"device": "cuda:1", "memory_gb": 2.0}},
}


def test_fit_spec_zero_overrides_the_experiment(tmp_path, monkeypatch):
    """``--experts 0`` is an override, not "not given" (the stage's three idioms disagreed on it)."""
    _params(tmp_path, monkeypatch, FIT)
    spec, _ = fit_spec("fit_adapters", "x", {"experts": None, "epochs": None})
    assert spec.experts == 2 and spec.subjects == {"width": 8, "experts": 0}
    spec, _ = fit_spec("fit_adapters", "x", {"experts": 0})
    assert spec.experts == 0 and spec.subjects is not None  # still two stores: multi-subject
    spec, _ = fit_spec("fit_adapters", "x", {"experts": 0, "fmri": "a.zarr"})
    assert spec.fmri == ["a.zarr"] and spec.experts == 0 and spec.subjects is None  # one store, no experts


def test_fit_spec_levels(tmp_path, monkeypatch):
    _params(tmp_path, monkeypatch, FIT)
    spec, run = fit_spec("fit_adapters", "x", {"epochs": 7, "seed": None, "device": None, "lora_rank": 4})
    assert spec.train == {"epochs": 7, "memory_gb": 2.0, "lr": 0.1, "patience": None}  # null is a value
    assert spec.params == {"width": 4} and spec.seed == 3 and spec.out == Path("runs/x")
    assert spec.subjects["lora_rank"] == 4 and run.device == "cuda:1"
    assert fit_spec("fit_adapters", None, {"method": "ridge", "device": "cpu"})[1].device == "cpu"
    with pytest.raises(UserError, match="no experiment 'y'"):
        fit_spec("fit_adapters", "y", {})
    with pytest.raises(UserError, match="give --method"):
        fit_spec("fit_adapters", None, {})


def test_stages_read_execution_settings(tmp_path, monkeypatch):
    _params(tmp_path, monkeypatch, {"decode": {"target": "t"}, EXECUTION: {"decode": {"device": "cpu"}}})
    assert resolve("decode", target=None, device=None) == {"target": "t", "device": "cpu"}
    assert resolve("decode", device="cuda")["device"] == "cuda"


def test_no_stage_lists_an_execution_setting_as_a_dvc_param():
    """Changing the device, batch size or workers in params.yaml ``execution`` reruns no DVC stage."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, body in stages.items():
        for entry in (body.get("do", body)).get("params", []):
            keys = [entry] if isinstance(entry, str) else list(entry)
            for key in keys:
                parts = key.split(".")
                assert parts[0] != EXECUTION and not EXECUTION_KEYS & set(parts), f"{name} lists {key}"
                value = params
                for part in parts:  # a whole section listed: none of its own keys is an execution one
                    value = value.get(part) if isinstance(value, dict) and "$" not in part else None
                if isinstance(value, dict):
                    assert not EXECUTION_KEYS & set(value), f"{name}: {key} holds {EXECUTION_KEYS & set(value)}"
    assert set(params[EXECUTION]) <= {s for s in params}, "every execution entry names a params.yaml stage section"


def _preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    return {p for k, v in tree.items() for p in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"})}


def test_presets_demo_is_params_yaml_and_nsd_round_trips():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    demo, nsd = _preset("demo"), _preset("nsd")
    assert apply_preset(params, demo) == params  # params.yaml is the demo preset: what `dvc repro` runs
    unset = set(nsd["unset"])
    nsd_keys = _leaves({k: v for k, v in nsd.items() if k != "unset"}) | unset
    assert {k for k in _leaves(demo) if not any(k.startswith(u + ".") for u in unset)} | unset == nsd_keys
    real = apply_preset(params, nsd)
    assert real["extract_clip"]["model"] == DEFAULT_MODEL and real["extract_clip"]["pretrained"] == DEFAULT_PRETRAINED
    assert "width" not in real["fit_adapters"]["mclip"]
    from dataclasses import asdict

    from pipeline.data.cc2017 import Design

    assert real["cc2017_design"] == asdict(Design())  # set, not removed: the video stages list it as a DVC param
    assert apply_preset(real, demo) == params


def test_preset_command_writes_params(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["preset", "nsd", "--params", str(target)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(target.read_text())["extract_clip"]["layers"] == "8,16,24,11-20:mean,24:proj"
    result = CliRunner().invoke(app, ["preset", "nope", "--params", str(target)])
    assert result.exit_code == 1 and result.output.startswith("error: no preset 'nope'"), result.output


def test_no_function_in_stages_is_longer_than_60_lines():
    """Stage modules stay thin: a command collects options (its signature is not counted) and calls a
    resolver and the pipeline function."""
    import ast

    long = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > 60:
                    long.append(f"{path.name}:{node.name} ({body} lines)")
    assert not long, long


def test_extract_clip_reads_execution_settings(tmp_path, monkeypatch):
    """The stage still reads the batch size and device that DVC no longer tracks; the command line wins."""
    from typer.testing import CliRunner

    import pipeline.features.extract as extract
    from cli import app

    _params(tmp_path, monkeypatch, {"extract_clip": {"stimuli": "s.hdf5", "model": "m", "layers": "6"},
                                    EXECUTION: {"extract_clip": {"batch_size": 7, "device": "cpu"}}})
    calls = []
    monkeypatch.setattr(extract, "extract_clip", lambda stimuli, out, spec, run, **kw: calls.append((spec, run)) or out)
    for args, batch in (([], 7), (["--batch-size", "9"], 9)):
        result = CliRunner().invoke(app, ["extract-clip", *args])
        assert result.exit_code == 0, result.output
        spec, run = calls[-1]
        assert (run.batch_size, run.device, spec.model, spec.layers, spec.pretrained) == (batch, "cpu", "m", "6", "openai")
