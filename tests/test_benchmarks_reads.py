"""Smoke run of benchmarks/reads.py at tiny sizes, so its README figure's command keeps working."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reads  # noqa: E402


def test_reads_benchmark_runs_in_seconds_and_cleans_up(tmp_path, capsys):
    reads.main(["--rows", "700", "--wanted", "80", "--tokens", "5", "--channels", "4", "--shard-rows", "64",
                "--baseline-rows", "3", "--folder", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert result["layout"]["shape"] == [700, 5, 4] and result["scattered"]["rows"] == 80
    assert result["scattered"]["read_amplification"] == result["consecutive"]["read_amplification"] == 1.0
    assert result["old_reader"]["baseline"]["read_amplification"] > 10  # each old slice ran to the array's end
    assert result["old_reader"]["amplification_80_rows_at_257x1024_counted"] > 10
    assert not list(tmp_path.iterdir())  # the store is removed
