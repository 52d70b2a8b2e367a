"""Read the cc2017 video-fMRI dataset (Wen et al. 2018, Cerebral Cortex) from its on-disk layout.

Everything here reads; nothing writes. The layout of the release (as NeuroClips' and Wen's code
read it, github gongzix/NeuroClips ``preprocess/.../movie_fmri_data_processing.m``)::

    <root>/stimuli/seg1.mp4 ... seg18.mp4, test1.mp4 ... test5.mp4          (30 fps movies, 8 min each)
    <root>/subject<N>/fmri/seg<k>/cifti/seg<k>_<r>_Atlas.dtseries.nii       r = 1, 2   (training)
    <root>/subject<N>/fmri/test<k>/cifti/test<k>_<r>_Atlas.dtseries.nii     r = 1..10  (testing)

Each run is a CIFTI-2 dense time series (volumes x grayordinates) with TR 2 s; the cortical
surface grayordinates (59,412 in the HCP 91k space, the first rows in Wen's code) are read through
the file's BrainModelAxis (the CORTEX_LEFT/RIGHT surface models), the subcortical ones are not
used. Training runs have 245 volumes, test1 245 and test2..5 246; Wen keeps 240 (8 min): the
first 1 or 2 and the last 4 volumes are dropped, i.e. the 240 volumes before the last 4.

Clips: one clip = one TR of the movie (2 s, 6 frames at 3 fps). Clip ids number the clips of
all segments in the order seg1..segS, test1..testT, ``trs_per_segment`` per segment; the fMRI
cache (``train/clip_ids``) and the video CLIP cache (row = clip id) both use this numbering, and
both record :meth:`Design.clip_layout` so stage 2 can check that they agree.

The sizes are a :class:`Design` (defaults: the real dataset), so the demo look-alike can be
smaller with the same code.

:class:`CC2017` is a :class:`~pipeline.data.dataset.Dataset` (registered as ``cc2017``) that answers
its split recipe; its stimuli are movies (read per clip by extract-clip --video) and its runs are
read by prepare-video-fmri, so the image and trial questions are answered "not this dataset".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import UserError
from .dataset import DatasetBase

CORTEX = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")
"""Brain structures whose surface vertices are the cortical grayordinates (label 1 = left, 2 = right)."""
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Segment:
    """One movie segment: its name (``seg3``, ``test1``), split, repetitions and first clip id."""

    name: str
    split: str
    repeats: int
    first_clip: int
    n_clips: int

    @property
    def clip_ids(self) -> np.ndarray:
        return np.arange(self.first_clip, self.first_clip + self.n_clips)


@dataclass(frozen=True)
class Design:
    """Sizes of a cc2017-style dataset; the defaults are the real release's."""

    train_segments: int = 18
    test_segments: int = 5
    train_repeats: int = 2
    test_repeats: int = 10
    tr: float = 2.0  # seconds per volume
    trs_per_segment: int = 240  # volumes kept per run = clips per segment (8 min)
    trailing_volumes: int = 4  # volumes after the kept window, dropped (Wen: the last 4)
    cortex_grayordinates: int | None = 59412  # every run must have this many; None: as many as the first run

    def __post_init__(self) -> None:
        for name in ("train_segments", "test_segments", "train_repeats", "test_repeats", "trs_per_segment"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"cc2017 design: {name} must be an integer >= 1, not {getattr(self, name)!r}")
        if not self.tr > 0 or self.trailing_volumes < 0:
            raise UserError(f"cc2017 design: tr must be > 0 and trailing_volumes >= 0 (got {self.tr}, {self.trailing_volumes})")

    @classmethod
    def from_params(cls, values: dict | None) -> Design:
        """A design from a params.yaml section; unknown keys are refused."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"cc2017 design: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**values)

    @property
    def segments(self) -> list[Segment]:
        """Training segments then test segments, with their clip-id ranges."""
        out, first = [], 0
        for split, count, repeats in (("train", self.train_segments, self.train_repeats),
                                      ("test", self.test_segments, self.test_repeats)):
            prefix = "seg" if split == "train" else "test"
            for k in range(1, count + 1):
                out.append(Segment(f"{prefix}{k}", split, repeats, first, self.trs_per_segment))
                first += self.trs_per_segment
        return out

    def split(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.split == name]

    @property
    def n_clips(self) -> int:
        return (self.train_segments + self.test_segments) * self.trs_per_segment

    def clip_layout(self) -> dict:
        """What a clip id means, recorded by both caches and compared by stage 2."""
        return {"segments": [[s.name, s.first_clip, s.n_clips] for s in self.segments], "tr": self.tr,
                "trs_per_segment": self.trs_per_segment}

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cortex:
    """The cortical grayordinates of a run: their rows in the file, hemisphere (1 left, 2 right) and vertex."""

    rows: np.ndarray  # (V,) int64 columns of the (volumes, grayordinates) data array
    hemisphere: np.ndarray  # (V,) int32
    vertex: np.ndarray  # (V,) int32 surface vertex numbers

    def same_as(self, other: Cortex) -> bool:
        return all(np.array_equal(a, b) for a, b in ((self.rows, other.rows), (self.hemisphere, other.hemisphere),
                                                     (self.vertex, other.vertex)))


@dataclass(frozen=True)
class Run:
    """One CIFTI run's cortical time series and what its header says."""

    path: Path
    data: np.ndarray  # (volumes, V) float32
    cortex: Cortex
    step: float | None  # the SeriesAxis step (seconds per volume), as written
    n_grayordinates: int  # all grayordinates in the file, cortical or not


class CC2017(DatasetBase):
    """Paths of one cc2017 root (see the module docstring) and readers for its runs."""

    name = "cc2017"
    split_recipe = "train = the seg<k> movie segments (runs kept apart); test = the test<k> segments (runs averaged)"

    def __init__(self, root: Path | str, design: Design = Design()):
        self.root = Path(root)
        self.design = design
        if not self.root.is_dir():
            raise UserError(f"cc2017 root not found: {self.root}")

    # ---- stimuli -----------------------------------------------------------------------------------
    @property
    def stimuli_dir(self) -> Path:
        """``<root>/stimuli``, or the root itself when it is the stimuli folder."""
        return self.root / "stimuli" if (self.root / "stimuli").is_dir() else self.root

    def video_path(self, segment: Segment | str) -> Path:
        name = segment.name if isinstance(segment, Segment) else segment
        return self.stimuli_dir / f"{name}.mp4"

    def check_videos(self) -> None:
        """Every segment of the design has its mp4: one error naming the missing ones."""
        missing = [s.name for s in self.design.segments if not self.video_path(s).is_file()]
        if missing:
            raise UserError(f"{self.stimuli_dir}: missing {len(missing)} movie segment(s): "
                            f"{', '.join(m + '.mp4' for m in missing[:6])}{' ...' if len(missing) > 6 else ''}")

    # ---- fMRI --------------------------------------------------------------------------------------
    def subject_dir(self, subject: int) -> Path:
        return self.root / f"subject{subject}" / "fmri"

    def run_path(self, subject: int, segment: Segment, repeat: int) -> Path:
        """``subject<N>/fmri/<seg>/cifti/<seg>_<repeat>_Atlas.dtseries.nii`` (repeat is 1-based)."""
        name = segment.name
        return self.subject_dir(subject) / name / "cifti" / f"{name}_{repeat}_Atlas.dtseries.nii"

    def check_runs(self, subject: int) -> None:
        """Every run of the design is present for ``subject``: one error naming the missing ones."""
        if not self.subject_dir(subject).is_dir():
            present = sorted(p.name for p in self.root.glob("subject*") if p.is_dir())
            raise UserError(f"{self.subject_dir(subject)} not found (subjects here: {', '.join(present) or 'none'})")
        missing = [self.run_path(subject, s, r) for s in self.design.segments for r in range(1, s.repeats + 1)
                   if not self.run_path(subject, s, r).is_file()]
        if missing:
            names = ", ".join(p.name for p in missing[:4])
            raise UserError(f"subject {subject}: {len(missing)} fMRI run(s) missing in {self.subject_dir(subject)} "
                            f"(first: {names}{' ...' if len(missing) > 4 else ''})")

    def read_run(self, path: Path, like: Cortex | None = None) -> Run:
        """The cortical time series of one run, checked against the design's grayordinate count and,
        with ``like``, against the grayordinates of the subject's first run."""
        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a readable CIFTI-2 file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not isinstance(img, nib.Cifti2Image):
            raise UserError(f"{path}: not a CIFTI-2 dense time series (read as {type(img).__name__})")
        try:
            series, models = img.header.get_axis(0), img.header.get_axis(1)
        except Exception as exc:
            raise UserError(f"{path}: CIFTI header without the two axes of a dtseries ({exc})") from None
        if not isinstance(series, nib.cifti2.SeriesAxis) or not isinstance(models, nib.cifti2.BrainModelAxis):
            raise UserError(f"{path}: expected (SeriesAxis, BrainModelAxis) axes of a .dtseries.nii, got "
                            f"({type(series).__name__}, {type(models).__name__})")
        cortex = _cortex(models)
        expected = self.design.cortex_grayordinates
        if expected is not None and len(cortex.rows) != expected:
            raise UserError(f"{path}: {len(cortex.rows)} cortical grayordinates, expected {expected} "
                            "(cc2017_design.cortex_grayordinates)")
        if like is not None and not cortex.same_as(like):
            raise UserError(f"{path}: its cortical grayordinates ({len(cortex.rows)}) differ from the subject's "
                            f"first run ({len(like.rows)}); all runs must be in the same CIFTI space")
        if len(cortex.rows) == 0:
            raise UserError(f"{path}: no cortical surface grayordinates ({', '.join(CORTEX)})")
        data = np.asarray(img.dataobj, dtype=np.float32)[:, cortex.rows]
        step = float(series.step) if series.unit == "SECOND" else None
        return Run(Path(path), data, cortex, step, len(models))


def _cortex(models: nib.cifti2.BrainModelAxis) -> Cortex:
    hemisphere = np.zeros(len(models), np.int32)
    for label, name in enumerate(CORTEX, start=1):
        hemisphere[(models.name == name) & models.surface_mask] = label
    rows = np.flatnonzero(hemisphere)
    return Cortex(rows, hemisphere[rows], models.vertex[rows].astype(np.int32))
