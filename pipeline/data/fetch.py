"""Fetch the raw NSD files this pipeline reads from the public bucket ``s3://natural-scenes-dataset``.

Anonymous reads through boto3 (any S3-compatible endpoint with ``endpoint_url``). The paths are the
ones :class:`pipeline.data.nsd.NSDLayout` opens, so the output folder is an NSD root that
``prepare-fmri --nsd-root`` reads as it is.

Nothing left on disk looks complete unless it is: a transfer writes ``<file>.part-<etag>`` (which
no reader globs) and renames it in when every byte has arrived and matches the bucket; a rerun
continues a ``.part`` file with a ranged read when the object's ETag is unchanged. The manifest
(:data:`MANIFEST`, written atomically after each file) records each complete file's size, ETag and
local sha256; a rerun re-hashes every file and fetches again those that differ, and nothing else.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..progress import bar, on_terminal
from ..store import human_bytes, write_text
from .nsd import DEFAULT_BETAS, ROI_NAMES, NSDLayout

BUCKET = "natural-scenes-dataset"
PARTS: tuple[str, ...] = ("betas", "rois", "stimuli", "design")
MANIFEST = "nsd_fetch_manifest.json"
TERMS_FILE = "NSD_TERMS_ACCEPTED.txt"
TERMS_WHERE = (
    "NSD is shared under the NSD Terms and Conditions, accepted through the data access form at "
    "https://naturalscenesdataset.org"
)
CHUNK = 1 << 20
RETRIES = 5  # broken streams resumed (ranged reads) per file before giving up


@dataclass(frozen=True)
class Remote:
    """One object of the bucket: key, size in bytes, ETag (quotes stripped)."""

    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class _Want:
    """Files wanted in one bucket folder: exact names (``required`` ones must exist) or a pattern."""

    folder: str
    names: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    pattern: str | None = None  # a regex on names; at least one must match


def parse_parts(what: str | None) -> list[str]:
    """``--what`` as a list of :data:`PARTS` (all of them when None)."""
    parts = PARTS if what is None else [w.strip() for w in what.split(",") if w.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UserError(f"--what takes a comma-separated list of {', '.join(PARTS)}; got {what!r}")
    return list(parts)


def _key(path: Path) -> str:
    return path.as_posix()


def plan(subjects: list[int], parts: list[str], betas: str = DEFAULT_BETAS) -> list[_Want]:
    """The bucket folders to list and the files wanted in each, from the paths the readers open."""
    lay = NSDLayout(".", betas)
    wants: list[_Want] = []
    if "design" in parts:
        names = frozenset({lay.expdesign_path.name, lay.stim_info_path.name})
        wants.append(_Want(_key(lay.expdesign_path.parent), names, names))
    if "stimuli" in parts:
        name = frozenset({lay.stimuli_path.name})
        wants.append(_Want(_key(lay.stimuli_path.parent), name, name))
    for s in subjects:
        if "rois" in parts:
            rois = frozenset(lay.roi_path(s, n).name for n in ROI_NAMES)
            wants.append(_Want(_key(lay.roi_path(s, "nsdgeneral").parent), rois,
                               frozenset({lay.roi_path(s, "nsdgeneral").name})))
            wants.append(_Want(_key(lay.ctab_path(s, "nsdgeneral").parent),
                               frozenset(lay.ctab_path(s, n).name for n in ROI_NAMES)))
        if "betas" in parts:
            wants.append(_Want(_key(lay.betas_dir(s)), pattern=r"betas_session\d\d\.hdf5"))
    return wants


@contextmanager
def _client_errors(endpoint: str) -> Iterator[None]:
    """botocore failures a user can fix as one :class:`UserError` line."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    try:
        yield
    except EndpointConnectionError as exc:
        raise UserError(f"cannot reach {endpoint} ({exc}); check the network connection or --endpoint-url") from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise UserError(f"{endpoint}: {err.get('Code', '?')}: {err.get('Message', exc)}") from None
    except BotoCoreError as exc:  # connect/read timeouts, broken connections after the retries
        raise UserError(f"cannot read from {endpoint} ({exc}); check the network connection and run again") from None


def make_client(endpoint_url: str | None, threads: int) -> Any:
    """An anonymous (unsigned) S3 client with a connection per thread."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED, max_pool_connections=max(threads, 10), connect_timeout=10,
                    read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name="us-east-1", config=config)


def list_remote(client: Any, wants: list[_Want], endpoint: str, bucket: str = BUCKET) -> list[Remote]:
    """The wanted objects that exist in the bucket; a missing required file is a :class:`UserError`."""
    found: list[Remote] = []
    with _client_errors(endpoint):
        for want in wants:
            prefix = want.folder.rstrip("/") + "/"
            listed: dict[str, Remote] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if "/" not in name:
                        listed[name] = Remote(obj["Key"], int(obj["Size"]), obj["ETag"].strip('"'))
            chosen = sorted(n for n in listed if n in want.names
                            or (want.pattern is not None and re.fullmatch(want.pattern, n)))
            missing = sorted(want.required - set(listed))
            if missing or (want.pattern is not None and not chosen):
                what = ", ".join(missing) or f"files matching {want.pattern}"
                raise UserError(f"s3://{bucket}/{prefix} has no {what} (at {endpoint})")
            found += [listed[n] for n in chosen]
    return found


def partial_path(dest: Path, etag: str) -> Path:
    """Where the bytes of ``dest`` gather while they arrive: ``<name>.part-<etag>`` (the ETag ties
    the bytes to one version of the object, so a changed object never resumes onto old bytes)."""
    return dest.with_name(f"{dest.name}.part-{re.sub(r'[^0-9A-Za-z-]', '', etag)}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(out: Path) -> dict[str, dict]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a fetch-nsd manifest; delete it to verify every file by fetching it again") from None


class _Stopped(Exception):
    """Another transfer failed or the user interrupted: stop this one, keep its ``.part`` file."""


class Fetcher:
    """One fetch into ``out``: verify what is there, download the rest in threads, keep the manifest."""

    def __init__(self, client: Any, out: Path, endpoint: str, threads: int = 8, bucket: str = BUCKET,
                 progress: bool | None = None) -> None:
        self.client, self.out, self.endpoint, self.bucket = client, Path(out), endpoint, bucket
        self.threads = threads
        self.progress = on_terminal() if progress is None else progress
        self.manifest = _read_manifest(self.out)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def dest(self, remote: Remote) -> Path:
        return self.out / remote.key

    def is_complete(self, remote: Remote) -> bool:
        """The local file has the manifest's size, ETag and sha256, and they match the bucket's now."""
        entry, dest = self.manifest.get(remote.key), self.dest(remote)
        if not entry or not dest.is_file() or (entry.get("size"), entry.get("etag")) != (remote.size, remote.etag):
            return False
        return dest.stat().st_size == remote.size and sha256_file(dest) == entry.get("sha256")

    def _pool(self, func: Callable[[Remote], Any], items: list[Remote]) -> list[Any]:
        """``func`` over ``items`` in threads; the first failure (or Ctrl-C) stops the others."""
        results: dict[str, Any] = {}
        pool = ThreadPoolExecutor(self.threads)
        try:
            futures: dict[Future, Remote] = {pool.submit(func, r): r for r in items}
            for fut in as_completed(futures):
                results[futures[fut].key] = fut.result()
        except BaseException:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        return [results[r.key] for r in items]

    def verify(self, remotes: list[Remote]) -> list[Remote]:
        """The files to fetch: those not complete (see :meth:`is_complete`), re-hashed in threads."""
        with bar(self.progress, total=len(remotes), desc="verifying", unit="file") as progress:
            def check(r: Remote) -> bool:
                ok = self.is_complete(r)
                with self._lock:
                    progress.update(1)
                return ok
            done = self._pool(check, remotes)
        return [r for r, ok in zip(remotes, done, strict=True) if not ok]

    def fetch(self, remotes: list[Remote]) -> None:
        """Download ``remotes`` (resuming ``.part`` files), recording each in the manifest when complete."""
        for r in remotes:  # a file that failed verification must not look complete while it is replaced
            self.dest(r).unlink(missing_ok=True)
            self.manifest.pop(r.key, None)
        with bar(self.progress, total=sum(r.size for r in remotes), desc="fetching", unit="B",
                 unit_scale=True) as progress:
            def advance(n: int) -> None:
                with self._lock:
                    progress.update(n)
            self._pool(lambda r: self._download(r, advance), remotes)

    def _download(self, remote: Remote, advance: Callable[[int], None]) -> None:
        from botocore.exceptions import ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        dest = self.dest(remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = partial_path(dest, remote.etag)
        for stale in dest.parent.glob(f"{glob.escape(dest.name)}.part-*"):
            if stale != part:  # bytes of another version of the object
                stale.unlink()
        if part.is_file() and part.stat().st_size > remote.size:
            part.unlink()
        sha, md5 = hashlib.sha256(), hashlib.md5()
        have = 0
        with open(part, "ab+") as f:
            f.seek(0)
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
                have += len(chunk)
            advance(have)
            broken = 0
            with _client_errors(self.endpoint):
                while have < remote.size:
                    ranged = {"Range": f"bytes={have}-"} if have else {}
                    try:
                        body = self.client.get_object(Bucket=self.bucket, Key=remote.key, IfMatch=f"\"{remote.etag}\"",
                                                      **ranged)["Body"]
                        for chunk in body.iter_chunks(CHUNK):
                            if self._stop.is_set():
                                raise _Stopped
                            f.write(chunk)
                            sha.update(chunk)
                            md5.update(chunk)
                            have += len(chunk)
                            advance(len(chunk))
                        if have >= remote.size:
                            break
                        exc: Exception = IncompleteReadError(actual_bytes=have, expected_bytes=remote.size)
                    except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError) as err:
                        exc = err
                    broken += 1  # the stream ended early: resume it with a ranged read
                    if broken > RETRIES:
                        raise UserError(f"s3://{self.bucket}/{remote.key}: the transfer broke {broken} times "
                                        f"({exc}); run again to resume it") from None
        if have != remote.size or ("-" not in remote.etag and md5.hexdigest() != remote.etag):
            part.unlink()  # a single-part ETag is the MD5 of the object: these bytes are not it
            raise UserError(f"s3://{self.bucket}/{remote.key}: the bytes received do not match the bucket's "
                            f"size/ETag; run again to fetch it anew")
        os.replace(part, dest)
        with self._lock:
            self.manifest[remote.key] = {"size": remote.size, "etag": remote.etag, "sha256": sha.hexdigest()}
            write_text(self.out / MANIFEST, json.dumps({"bucket": self.bucket, "files": self.manifest},
                                                       indent=1, sort_keys=True))

    def partial_bytes(self, remote: Remote) -> int:
        part = partial_path(self.dest(remote), remote.etag)
        return min(part.stat().st_size, remote.size) if part.is_file() else 0


def terms_accepted(out: Path) -> bool:
    return (Path(out) / TERMS_FILE).is_file()


def record_terms(out: Path) -> None:
    """Note in ``out`` that the user accepted the NSD terms, so later fetches into it need no flag."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_text(Path(out) / TERMS_FILE, f"--accept-nsd-terms given on {when}.\n{TERMS_WHERE}.\n")


def check_free(out: Path, need: int) -> None:
    """Fail before downloading when ``need`` bytes will not fit on the file system of ``out``."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(f"--out {out}: fetching needs {human_bytes(need)} but only {human_bytes(free)} is free; "
                        "free space, fetch fewer --subjects or --what, or choose another --out")


def fetch_nsd(out: Path, subjects: list[int], parts: list[str], endpoint_url: str | None = None,
              dry_run: bool = False, accept_terms: bool = False, threads: int = 8,
              echo: Callable[[str], None] = print, client: Any = None) -> list[Remote]:
    """List the NSD files this pipeline reads for ``subjects`` and ``parts`` (printed with their total
    size), then, unless ``dry_run``, fetch into ``out`` those not already complete. Returns the list."""
    out, subjects = Path(out), sorted(set(subjects))
    if not subjects or any(not 1 <= s <= 8 for s in subjects):
        raise UserError(f"--subjects takes NSD subject numbers 1..8; got {subjects}")
    if not dry_run and not (accept_terms or terms_accepted(out)):
        raise UserError(f"{TERMS_WHERE}; accept them there, then pass --accept-nsd-terms (recorded in --out)")
    endpoint = endpoint_url or f"s3://{BUCKET}"
    client = client or make_client(endpoint_url, threads)
    remotes = list_remote(client, plan(subjects, parts), endpoint)
    for r in remotes:
        echo(f"{human_bytes(r.size):>10}  {r.key}")
    echo(f"{len(remotes)} files, {human_bytes(sum(r.size for r in remotes))} in total")
    if dry_run:
        return remotes
    out.mkdir(parents=True, exist_ok=True)
    if not terms_accepted(out):
        record_terms(out)
    fetcher = Fetcher(client, out, endpoint, threads)
    todo = fetcher.verify(remotes)
    need = sum(r.size - fetcher.partial_bytes(r) for r in todo)
    echo(f"{len(remotes) - len(todo)} already complete and verified; fetching {len(todo)} ({human_bytes(need)})")
    check_free(out, need)
    fetcher.fetch(todo)
    return remotes
