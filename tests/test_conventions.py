"""Project-wide conventions: one error type, one way to report a missing setting."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.errors import UserError


def test_user_error_is_a_value_error():
    with pytest.raises(ValueError, match="bad input"):
        raise UserError("bad input")


@pytest.mark.parametrize("args, setting", [
    # stages that reported a missing setting as typer.BadParameter (exit 2, a boxed usage message) ...
    (["decode", "--run", "r"], "decode.nsd_root"),
    (["evaluate", "--run", "r"], "evaluate.nsd_root"),
    (["prepare-fmri", "--subject", "1"], "prepare_fmri.nsd_root"),
    (["prepare-video-fmri", "--subject", "1"], "prepare_video_fmri.root"),
    (["extract-clip"], "extract_clip.stimuli"),
    (["analyze-layers", "--fmri", "f"], "analyze_layers.clip"),
    (["decode-video"], "decode_video.semantic"),
    # ... and the one that already raised UserError (exit 1, one line)
    (["fit-adapters", "--method", "ridge"], "fit_adapters.fmri"),
])
def test_missing_setting_is_one_line_and_exit_1(args, setting, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the setting is given nowhere
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: give --{setting.split('.')[1].replace('_', '-')} or set {setting} in params.yaml"]
