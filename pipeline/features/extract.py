"""extract-clip on NSD: per-layer CLIP tokens of every image of ``imgBrick`` -> the features cache (:mod:`.cache`).

``source`` other than ``nsd`` reads a release's images instead (:mod:`pipeline.data.releases.stimuli`):
rows are still 0-based 73k ids, and 224-px float images reach a 224-px model without a second
resize (:func:`.pixels.transform_pixels`). Rows a release has no image for stay 0, are never computed,
and are not counted as filled (``stimulus_ids``, :func:`.cache.filled_rows`).

``--images`` picks rows and every shard holding one of them is filled whole; shards, resume and
dask execution are :mod:`.shards`' (the same for the movie clips of :mod:`.video`). Captions
(``text_embeds``) come from the COCO annotations through ``nsd_stim_info_merged.csv``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..data.nsd import NSD, NSDLayout, open_hdf5
from ..data.releases.stimuli import NSD_IMAGES, ReleaseStimuli, open_stimuli
from ..device import resolve_device
from ..errors import UserError
from . import clip
from .cache import CAPTIONS_PER_IMAGE, SHARD_ROWS, store_layout
from .pixels import input_size, transform_pixels
from .shards import fill_store, layer_outputs, model_attrs, model_settings, setup, versions
from .spec import ClipSpec, Execution, with_defaults, with_options

BATCH_SIZE = 64
"""Images per forward pass unless :class:`Execution` says otherwise."""


# ---- inputs -----------------------------------------------------------------------------------------
def resolve_stimuli(path: Path | str) -> tuple[Path, NSD | None]:
    """``--stimuli``: an ``nsd_stimuli.hdf5`` or an NSD root holding it; the NSD root too when known
    (for ``--images shared|subject:N`` and for captions)."""
    path = Path(path)
    if path.is_dir():
        nsd = NSD(path)
        if not nsd.stimuli_path.is_file():
            raise UserError(f"--stimuli: {path} holds no {nsd.stimuli_path.relative_to(path)}")
        return nsd.stimuli_path, nsd
    if not path.is_file():
        raise UserError(f"--stimuli: not found: {path} (give nsd_stimuli.hdf5 or the NSD root)")
    parents = path.resolve().parents
    root = parents[3] if len(parents) > 3 else None
    if root is not None and NSDLayout(root).stimuli_path == path.resolve():
        return path, NSD(root)
    return path, None


def describe_source(path: Path, n_samples: int = 64) -> dict:
    """Shape, size and a content fingerprint (sha256 of ``n_samples`` evenly spaced images) of ``imgBrick``.

    The fingerprint is part of the settings a store is resumed with: a regenerated or different
    image file is refused instead of silently mixed in, without hashing 40 GB.
    """
    with open_hdf5(path) as f:
        if "imgBrick" not in f:
            raise UserError(f"{path}: no 'imgBrick' dataset (found {sorted(f.keys())})")
        images = f["imgBrick"]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[0] == 0:
            raise UserError(f"{path}: imgBrick must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        h = hashlib.sha256(repr(images.shape).encode())
        for i in np.unique(np.linspace(0, images.shape[0] - 1, n_samples).astype(int)):
            h.update(images[i].tobytes())
        return {
            "path": str(path),  # as given (resolving it would make every clone's store differ)
            "size": path.stat().st_size,
            "n_images": int(images.shape[0]),
            "image_shape": list(images.shape[1:]),
            "fingerprint": h.hexdigest(),
        }


def select_images(spec: str, n: int, nsd: NSD | None) -> np.ndarray:
    """0-based ids ``--images`` asks for: ``all``, ``shared`` (NSD's shared images), ``subject:N``
    (the subject's images in ``subjectim``) or ``A-B`` (ids A..B inclusive)."""
    spec = str(spec).strip()
    if spec == "all":
        return np.arange(n)
    kind, _, arg = spec.partition(":")
    if spec == "shared" or (kind == "subject" and arg.isdigit()):
        if nsd is None or not nsd.expdesign_path.is_file():
            raise UserError(
                f"--images {spec} needs nsd_expdesign.mat: give --stimuli as the NSD root that holds it"
            )
        design = nsd.expdesign
        if spec == "shared":
            ids = design.sharedix - 1
        else:
            if not 1 <= int(arg) <= design.subjectim.shape[0]:
                raise UserError(f"--images {spec}: subjects are 1..{design.subjectim.shape[0]}")
            ids = design.subjectim[int(arg) - 1] - 1
    elif spec.count("-") == 1 and all(p.isdigit() for p in spec.split("-")):
        a, b = (int(p) for p in spec.split("-"))
        if not a <= b < n:
            raise UserError(f"--images {spec}: need A <= B < {n} (0-based ids of the {n} stimuli)")
        ids = np.arange(a, b + 1)
    else:
        raise UserError(
            f"--images must be all, shared, subject:N or A-B (0-based ids, inclusive), not {spec!r}"
        )
    ids = np.unique(ids)
    if ids.size and not 0 <= ids[0] <= ids[-1] < n:
        raise UserError(f"--images {spec}: ids reach {ids[-1]} but the stimulus file has {n} images")
    return ids


def brick_captions(path: Path) -> bool:
    """Whether a stimulus file carries its own ``captions`` (n, 5) strings (GOD's class-name prompts)."""
    with open_hdf5(path) as f:
        return "captions" in f


def brick_caption_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 5) str captions of a stimulus file that has its own."""
    with open_hdf5(path) as f:
        captions = f["captions"]
        if captions.ndim != 2 or captions.shape[1] != CAPTIONS_PER_IMAGE:
            raise UserError(f"{path}: 'captions' must be (n, {CAPTIONS_PER_IMAGE}), got {captions.shape}")
        table = captions[()][rows]
    return np.vectorize(lambda c: c.decode() if isinstance(c, bytes) else str(c), otypes=[object])(table).astype(str)


# ---- reading images -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSource:
    """NSD's ``imgBrick``: row i is image i."""

    path: str

    def dataset(self, spans: list[tuple[int, int, int]], transform: Callable) -> torch.utils.data.Dataset:
        return _Batches(self.path, spans, transform)

    def encode(self, loaded: clip.LoadedModel, inputs: torch.Tensor, layers: list[clip.LayerSpec],
               tokens: clip.TokenMode, device: str) -> dict[str, torch.Tensor]:
        toks, embeds = clip.encode_layers(loaded, inputs.to(device, non_blocking=True), layers, tokens)
        out = layer_outputs(toks)
        out["image_embeds"] = embeds.float()
        return out


class _Batches(torch.utils.data.Dataset):
    """Item i = batch i as preprocessed pixels; each loader process opens the HDF5 file itself."""

    def __init__(self, path: str, spans: list[tuple[int, int, int]], transform: Callable) -> None:
        self.path, self.spans, self.transform = path, spans, transform
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        _, a, b = self.spans[i]
        return i, clip.preprocess_images(self.transform, self._file["imgBrick"][a:b])


@dataclass(frozen=True)
class ReleaseSource(ImageSource):
    """A release's images by 73k id (``path``: its root or image file); plain values, opened where read."""

    source: str = "mindeye2"
    subject: int | None = None
    size: int = 224  # the model's input size

    def dataset(self, spans: list[tuple[int, int, int]], transform: Callable) -> torch.utils.data.Dataset:
        return _ReleaseBatches(self, spans, transform)

    def encode(self, loaded: clip.LoadedModel, inputs: tuple[torch.Tensor, torch.Tensor], layers: list[clip.LayerSpec],
               tokens: clip.TokenMode, device: str) -> dict[str, torch.Tensor]:
        """Outputs of the rows with an image, 0 for the others (one blank image runs when none has one)."""
        pixels, held = inputs
        blank = not bool(held.any())
        if blank:
            pixels = torch.zeros((1, 3, self.size, self.size))
        out = super().encode(loaded, pixels, layers, tokens, device)
        full = {}
        for k, v in out.items():
            full[k] = v.new_zeros((len(held), *v.shape[1:]))
            if not blank:
                full[k][held.to(v.device)] = v
        return full


class _ReleaseBatches(torch.utils.data.Dataset):
    """Item i = (pixels of the rows of batch i that have an image, which rows those are)."""

    def __init__(self, source: ReleaseSource, spans: list[tuple[int, int, int]], transform: Callable) -> None:
        self.source, self.spans, self.transform = source, spans, transform
        self._stimuli: ReleaseStimuli | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        if self._stimuli is None:
            self._stimuli = open_stimuli(self.source.source, self.source.path, self.source.subject)
        _, a, b = self.spans[i]
        rows = np.arange(a, b)
        held = np.isin(rows, self._stimuli.ids)
        size = self.source.size
        pixels = (transform_pixels(self.transform, size, self._stimuli.read(rows[held])) if held.any()
                  else torch.zeros((0, 3, size, size)))
        return i, (pixels, torch.from_numpy(held))


def describe_release(stim: ReleaseStimuli, subject: int | None, n_samples: int = 64) -> dict:
    """:func:`describe_source` of a release: its images' shape and a fingerprint (sha256 of its ids and
    ``n_samples`` evenly spaced images), so a store is resumed from the same images only."""
    picked = stim.ids[np.unique(np.linspace(0, len(stim.ids) - 1, n_samples).astype(int))]
    images = stim.read(picked)
    h = hashlib.sha256(f"{stim.source}:{subject}".encode())
    h.update(stim.ids.astype(np.int64).tobytes())
    h.update(np.ascontiguousarray(images).tobytes())
    return {"path": str(stim.path), "release": stim.source, "subject": subject, "size": None,
            "n_images": NSD_IMAGES if subject is not None else int(stim.ids.max()) + 1,
            "n_with_image": int(len(stim.ids)), "image_shape": list(images.shape[1:]),
            "image_dtype": str(images.dtype), "fingerprint": h.hexdigest()}


def release_images(source: str, stimuli: Path | str, images: str) -> tuple[ReleaseStimuli, int | None]:
    """``--source``'s stimuli at ``--stimuli``; releases that keep images per subject take the
    subject from ``--images subject:N``."""
    kind, _, arg = str(images).strip().partition(":")
    if source in ("mindeye1", "brain-diffuser"):
        if kind != "subject" or not arg.isdigit():
            raise UserError(f"--source {source} keeps its images per subject: give --images subject:N")
        return open_stimuli(source, stimuli, int(arg)), int(arg)
    if kind == "subject" or images == "shared":
        raise UserError(f"--images {images} needs NSD's design: with --source {source} use all or A-B")
    return open_stimuli(source, stimuli), None


def extract_clip(
    stimuli: Path | str,
    out: Path | str,
    spec: ClipSpec = ClipSpec(),
    run: Execution = Execution(),
    *,
    source: str = "nsd",
    images: str = "all",
    captions: bool | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = lambda line: None,
    **options,
) -> Path:
    """Fill (or resume) the CLIP cache at ``out``; see the module docstring for the layout.

    ``spec``: what the store holds (``activation``: ``auto`` builds the activation the weights were
    trained with, QuickGELU for OpenAI's, see :func:`pipeline.features.clip.resolve_architecture`;
    ``gelu``/``quick_gelu`` force one, refused when it contradicts a tag). ``run``: how it runs
    (``workers``/``scheduler`` run the shards on dask.distributed, a local cluster of N processes or
    a running scheduler whose workers see the same ``stimuli`` and ``out`` paths; ``device=auto`` is
    then resolved on each worker, so set ``dtype`` when this process has no GPU but the workers do).
    ``options``: fields of either by name, e.g. ``layers="6", device="cpu"``, over ``spec`` and ``run``.
    ``captions``: None = write ``text_embeds`` when the NSD root has the stim-info table and COCO
    annotations, True = require them, False = skip. ``report`` receives the size projection line.
    ``source``: ``nsd`` (``stimuli`` = ``nsd_stimuli.hdf5`` or the NSD root) or a release
    (``mindeye2``/``mindeye1``/``brain-diffuser``: its root or image file; no captions).
    """
    out = Path(out)
    spec, run = with_options((spec, run), options)
    if not run.distributed:
        resolve_device(run.device)  # a device this machine lacks fails before any input is read
    held = None
    if source == "nsd":
        path, nsd = resolve_stimuli(stimuli)
        described = describe_source(path)
        wanted = select_images(images, described["n_images"], nsd)
    elif captions:
        raise UserError(f"--captions: captions come from NSD's COCO annotations; --source {source} writes no text_embeds")
    else:  # the release is checked before the model loads
        stim, subject = release_images(source, stimuli, images)
        described, nsd = describe_release(stim, subject), None
        wanted = stim.ids if subject is not None else select_images(images, described["n_images"], None)
        wanted = np.intersect1d(wanted, stim.ids)
        held = stim.ids if len(stim.ids) < described["n_images"] else None
    st = setup(*with_defaults(spec, run, shard_rows=SHARD_ROWS, batch_size=BATCH_SIZE))
    reader = (ImageSource(str(path)) if source == "nsd" else
              ReleaseSource(str(stim.path), source=source, subject=subject, size=input_size(st.loaded)))
    n = described["n_images"]

    own = source == "nsd" and nsd is None and brick_captions(path)  # a stimulus file with its own captions (GOD)
    has_captions = own or (
        nsd is not None and nsd.stim_info_path.is_file()
        and nsd.annotations_path("captions", "train2017").parent.is_dir()
    )
    if captions and not has_captions:
        raise UserError(
            f"captions requested but --stimuli {stimuli} is not an NSD root with "
            "nsddata/experiments/nsd/nsd_stim_info_merged.csv and nsddata_stimuli/stimuli/nsd/annotations/ "
            "nor a stimulus file with its own captions"
        )
    use_captions = has_captions if captions is None else bool(captions)

    shard_rows = st.spec.shard_rows
    layout = store_layout(st.loaded, st.layers, st.tokens, n, shard_rows, spec.chunk_rows, use_captions)
    settings = {
        **model_settings(st, layout),
        "captions": use_captions,
        "source": {k: described[k] for k in ("size", "n_images", "image_shape", "fingerprint")},
    }
    attrs = {
        "settings": settings,
        **model_attrs(st, layout),
        "source": described,
        **({"stimulus_ids": held.tolist()} if held is not None else {}),
        "captions": {"per_image": CAPTIONS_PER_IMAGE, "source": f"the 'captions' of {path}" if own
                     else "COCO annotations via nsd_stim_info_merged.csv"}
        if use_captions else None,
        "N": n,
        "versions": versions(),
    }

    def caption_table(todo: dict[int, tuple[int, int]]) -> dict[int, np.ndarray]:
        """Read once here (COCO's json is large), handed to workers shard by shard."""
        rows = np.concatenate([np.arange(a, b) for a, b in todo.values()])
        table = brick_caption_rows(path, rows) if own else nsd.captions(rows, CAPTIONS_PER_IMAGE)
        offsets = np.cumsum([0] + [b - a for a, b in todo.values()])
        return {s: table[offsets[k] : offsets[k + 1]] for k, s in enumerate(todo)}

    requested = np.unique(wanted // shard_rows).tolist()
    return fill_store(out, st, reader, layout, settings, attrs, requested, overwrite=overwrite,
                      captions=caption_table if use_captions else None, report=report)
