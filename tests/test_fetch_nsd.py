"""``fetch-nsd`` end to end against moto's S3 server (127.0.0.1, a free port) serving a small demo
NSD tree in a public bucket named like NSD's: full fetch, resume with a ranged read, re-fetch of a
corrupted file only, dry run, the terms flag, an unreachable endpoint and a full disk."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import zarr
from botocore.response import StreamingBody
from moto import server as moto_server
from typer.testing import CliRunner

from cli import app
from pipeline.data import fetch
from pipeline.demo.nsd import DemoConfig, make_demo
from pipeline.demo.tower import TowerTraining
from pipeline.data.fmri import prepare_fmri

SUBJECTS = (1, 2)


def _read_by_pipeline(root: Path) -> set[str]:
    """The demo files the readers open (an independent list: globs of the NSD layout, not fetch.plan)."""
    pats = ["nsddata/experiments/nsd/nsd_expdesign.mat", "nsddata/experiments/nsd/nsd_stim_info_merged.csv",
            "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"]
    for s in SUBJECTS:
        pats += [f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/*.nii.gz", f"nsddata/freesurfer/subj{s:02d}/label/*.ctab",
                 f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session*.hdf5"]
    return {p.relative_to(root).as_posix() for pat in pats for p in root.glob(pat)}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(endpoint URL, demo root) of a moto server whose public bucket holds the whole demo tree."""
    cfg = DemoConfig(n_images=60, subjects=(1, 2, 5), sessions=(2, 1, 1), trials_per_session=30, n_shared=5,
                     volume=(8, 9, 7), tower=TowerTraining(epochs=0))
    root = make_demo(tmp_path_factory.mktemp("fetch") / "nsd", cfg)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    s3.create_bucket(Bucket=fetch.BUCKET)
    arn = f"arn:aws:s3:::{fetch.BUCKET}"
    s3.put_bucket_policy(Bucket=fetch.BUCKET, Policy=json.dumps({  # anonymous reads, as NSD's bucket allows
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [arn, f"{arn}/*"]}]}))
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        s3.upload_file(str(path), fetch.BUCKET, path.relative_to(root).as_posix())
    yield url, root
    server.stop()


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """(key, Range header) of every GetObject the fetch sends."""
    sent: list[tuple[str, str | None]] = []
    make = fetch.make_client

    def recording(endpoint_url: str | None, threads: int):
        client = make(endpoint_url, threads)
        client.meta.events.register("provide-client-params.s3.GetObject",
                                    lambda params, **_: sent.append((params["Key"], params.get("Range"))))
        return client

    monkeypatch.setattr(fetch, "make_client", recording)
    return sent


def run(url: str | None, out: Path, *extra: str):
    args = ["fetch-nsd", "--subjects", ",".join(map(str, SUBJECTS)), "--out", str(out), *extra]
    return CliRunner().invoke(app, [*args, "--endpoint-url", url] if url else args)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_resume_and_refetch(bucket, requests, tmp_path):
    url, root = bucket
    out = tmp_path / "nsd"
    wanted = _read_by_pipeline(root)
    assert len(wanted) > 20 and any("betas_session02" in k for k in wanted)

    result = run(url, out, "--accept-nsd-terms")
    assert result.exit_code == 0, result.output
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {fetch.MANIFEST, fetch.TERMS_FILE}
    assert got == wanted  # exactly the files the pipeline reads: no subject 5, no responses.tsv, no annotations
    for key in wanted:
        assert (out / key).read_bytes() == (root / key).read_bytes(), key
    manifest = json.loads((out / fetch.MANIFEST).read_text())["files"]
    assert {k: v["sha256"] for k, v in manifest.items()} == {k: _sha(root / k) for k in wanted}
    assert sorted(k for k, _ in requests) == sorted(wanted)
    # and it is all prepare-fmri needs: the same store as from the full tree
    stores = [zarr.open_group(prepare_fmri(r, 1, tmp_path / f"{i}.zarr", progress=False), mode="r")
              for i, r in enumerate((root, out))]
    arrays = [dict(g.members(max_depth=None)) for g in stores]
    assert arrays[0].keys() == arrays[1].keys() and "betas" in str(arrays[0].keys())
    for name, a in arrays[0].items():
        if isinstance(a, zarr.Array):
            np.testing.assert_array_equal(a[...], arrays[1][name][...], err_msg=name)

    # a rerun without the flag (recorded) verifies and fetches nothing
    requests.clear()
    assert run(url, out).exit_code == 0 and requests == []

    # a same-size corruption is fetched again, and nothing else
    victim = "nsddata/experiments/nsd/nsd_expdesign.mat"
    data = bytearray((out / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    result = run(url, out)
    assert result.exit_code == 0, result.output
    assert requests == [(victim, None)]
    assert (out / victim).read_bytes() == (root / victim).read_bytes()

    # a transfer killed after k bytes continues with a ranged read from byte k
    requests.clear()
    key = sorted(k for k in wanted if k.endswith("betas_session01.hdf5"))[0]
    etag = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test").head_object(Bucket=fetch.BUCKET, Key=key)["ETag"].strip('"')
    full = (root / key).read_bytes()
    k = len(full) // 3
    (out / key).unlink()
    fetch.partial_path(out / key, etag).write_bytes(full[:k])
    assert (out / key).parent.glob("*.part-*")  # the partial is not mistaken for the file
    result = run(url, out)
    assert result.exit_code == 0, result.output
    assert requests == [(key, f"bytes={k}-")]
    assert (out / key).read_bytes() == full
    assert not list(out.rglob("*.part-*"))


def test_truncated_stream_resumes_with_a_ranged_read(bucket, requests, tmp_path, monkeypatch):
    url, root = bucket
    key = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    size = (root / key).stat().st_size
    cut = size // 2
    recording = fetch.make_client

    def truncating(endpoint_url: str | None, threads: int):
        client = recording(endpoint_url, threads)
        done: list[bool] = []

        def drop_connection(parsed, **_):  # the first response ends after `cut` bytes of its announced length
            if not done:
                done.append(True)
                parsed["Body"] = StreamingBody(io.BytesIO(parsed["Body"].read(cut)), size)

        client.meta.events.register("after-call.s3.GetObject", drop_connection)
        return client

    monkeypatch.setattr(fetch, "make_client", truncating)
    result = run(url, tmp_path / "nsd", "--accept-nsd-terms", "--what", "stimuli")
    assert result.exit_code == 0, result.output
    assert requests == [(key, None), (key, f"bytes={cut}-")]
    assert (tmp_path / "nsd" / key).read_bytes() == (root / key).read_bytes()


def test_dry_run_lists_files_and_size_and_writes_nothing(bucket, tmp_path):
    url, root = bucket
    out = tmp_path / "nsd"
    result = run(url, out, "--dry-run", "--what", "rois,design")
    assert result.exit_code == 0, result.output
    listed = {line.split()[-1] for line in result.output.splitlines() if line.split()[-1].startswith("nsddata")}
    expect = {k for k in _read_by_pipeline(root) if "/roi/" in k or "/label/" in k or "/experiments/" in k}
    assert listed == expect
    total = sum((root / k).stat().st_size for k in expect)
    assert f"{len(expect)} files, {fetch.human_bytes(total)} in total" in result.output
    assert not out.exists()


def test_terms_flag_required(bucket, tmp_path):
    url, _ = bucket
    line = one_error_line(run(url, tmp_path / "nsd"))
    assert "--accept-nsd-terms" in line and "naturalscenesdataset.org" in line
    assert not (tmp_path / "nsd").exists()


def test_unreachable_endpoint_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_error_line(run(f"http://127.0.0.1:{port}", tmp_path / "nsd", "--accept-nsd-terms"))
    assert "cannot reach" in line and str(port) in line
    assert not (tmp_path / "nsd").exists()


def test_full_disk_is_one_line_and_nothing_complete(bucket, tmp_path, monkeypatch):
    url, _ = bucket
    out = tmp_path / "nsd"
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
    line = one_error_line(run(url, out, "--accept-nsd-terms"))
    assert "free" in line
    assert {p.name for p in out.rglob("*") if p.is_file()} <= {fetch.TERMS_FILE}


@pytest.mark.parametrize("failure, code, line", [
    (OSError(errno.ENOSPC, "No space left on device"), 1, "error: disk full while writing"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_failure_mid_transfer_leaves_nothing_complete(bucket, tmp_path, monkeypatch, failure, code, line):
    """A write that fails (a full disk) or Ctrl-C in the middle of a file: one line, a non-zero exit,
    the bytes so far in a .part file only, and the manifest without that file."""
    url, root = bucket
    out = tmp_path / "nsd"
    key = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    make = fetch.make_client

    def failing(endpoint_url: str | None, threads: int):
        client = make(endpoint_url, threads)

        def fail_after_a_chunk(parsed, **_):
            body = parsed["Body"]

            def chunks(n: int) -> Iterator[bytes]:
                yield body.read(n)
                raise failure
            parsed["Body"] = type("Failing", (), {"iter_chunks": lambda _self, n: chunks(n)})()

        client.meta.events.register("after-call.s3.GetObject", fail_after_a_chunk)
        return client

    monkeypatch.setattr(fetch, "make_client", failing)
    monkeypatch.setattr(fetch, "CHUNK", 4096)
    result = run(url, out, "--accept-nsd-terms", "--what", "stimuli")
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.output.splitlines()[-1] == line
    assert not (out / key).exists() and len(list(out.rglob("*.part-*"))) == 1
    assert not (out / fetch.MANIFEST).exists()


def test_partial_of_another_object_version_is_not_resumed(bucket, requests, tmp_path):
    """Bytes gathered under an older ETag are dropped: the file is fetched whole, not resumed onto them."""
    url, root = bucket
    out = tmp_path / "nsd"
    key = "nsddata/experiments/nsd/nsd_expdesign.mat"
    stale = fetch.partial_path(out / key, "0123abcd-2")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 100)
    result = run(url, out, "--accept-nsd-terms", "--what", "design")
    assert result.exit_code == 0, result.output
    assert (key, None) in requests and all(r is None for _, r in requests)
    assert (out / key).read_bytes() == (root / key).read_bytes() and not stale.exists()
