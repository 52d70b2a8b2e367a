"""Generic Object Decoding (GOD; Horikawa & Kamitani 2017): a BData reader and the dataset's splits.

The release (figshare 7387130, KamitaniLab/GenericObjectDecoding) has one ``Subject{1..5}.h5`` per
subject in BData format (bdpy / BrainDecoderToolbox2): ``/dataset`` (samples x columns) and
``/metadata/{key,description,value}`` (value: keys x columns; a column belongs to a key where the
value is 1). :func:`read_bdata` reads that layout with h5py alone (bdpy writes the same layout;
older files spell the groups ``dataSet`` / ``metaData``, as bdpy's own reader accepts). Keys used:

- ``VoxelData`` (voxel columns), ``voxel_x/y/z`` (their coordinates),
- ``ROI_<name>`` for V1, V2, V3, V4, LOC, FFA, PPA, LVC, HVC, VC (the dataset's demo selects
  ``'ROI_VC = 1'``), one value per voxel column,
- ``DataType``: 1 training perception, 2 test perception, 3 test imagery,
- ``Run``, and the stimulus label ``stimulus_id`` (the current release; files before 2019 call it
  ``Label``): synset number + image index / 1e6, e.g. ``1518878.010042`` is ``n01518878_10042``;
  imagery trials carry the synset number alone (the imagined category).

Normalisation (``normalize=``): ``"train"`` (default) is what the dataset's own decoders do
(code/python/analysis_FeaturePrediction.py and the MATLAB demo): z-score each voxel with the mean
and standard deviation (ddof=1) of the training samples, applied to every split. ``"run"`` z-scores
each voxel within each run (a (DataType, Run) pair) instead (per-run baseline drifts removed); ``"none"`` keeps the release's
values. Test perception trials (each test image shown many times) are averaged per image and imagery
trials per category, as the papers do.

Stimuli are ImageNet images, given on request only: the user's folder holds them named by stimulus
id (``n01518878_10042.JPEG``, as in data/imageID_*.csv). Class names come from
``god_classes.tsv`` (150 training synsets: KamitaniLab/GOD_stimuli_annotations
data/ImageNetTraining_category.jsonl; 50 test synsets: GenericObjectDecoding
data/ImageNetTest_synset.xlsx), so no WordNet download is needed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..errors import UserError
from ..store import atomic_file
from .dataset import DatasetBase

ROIS = ("V1", "V2", "V3", "V4", "LOC", "FFA", "PPA", "LVC", "HVC", "VC")
SPLITS = {"train": 1, "test": 2, "imagery": 3}
"""Split name -> ``DataType`` value."""
LABEL_KEYS = ("stimulus_id", "Label")
"""The stimulus-label key, newest spelling first."""
REQUIRED_KEYS = ("VoxelData", "DataType", "Run")
NORMALIZE = ("train", "run", "none")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
CLASS_TABLE = Path(__file__).with_name("god_classes.tsv")
IMAGE_SIZE = 500
"""Side of the square RGB images in the image brick (the release's test images are 500 px or less)."""


@dataclass(frozen=True)
class BData:
    """One BData file in memory: ``dataset`` (n, c) and metadata ``keys`` / ``descriptions`` / ``values`` (k, c)."""

    path: Path
    dataset: np.ndarray
    keys: tuple[str, ...]
    descriptions: tuple[str, ...]
    values: np.ndarray

    def columns(self, key: str) -> np.ndarray:
        """Bool (c,) mask of the columns whose ``key`` metadata is 1 (bdpy's ``select(key)``)."""
        if key not in self.keys:
            raise UserError(f"{self.path}: no metadata key {key!r} (keys: {', '.join(self.keys)})")
        return self.values[self.keys.index(key)] == 1

    def select(self, key: str) -> np.ndarray:
        """(n, columns) data of the columns that ``key`` marks."""
        return self.dataset[:, self.columns(key)]

    def metadata(self, key: str, where: str | np.ndarray) -> np.ndarray:
        """Metadata ``key``'s values on the columns that key ``where`` marks (bdpy's
        ``get_metadata(key, where=)``) or that a bool column mask ``where`` selects."""
        self.columns(key)
        return self.values[self.keys.index(key), self.columns(where) if isinstance(where, str) else where]


def _text(x: bytes | str) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_bdata(path: Path) -> BData:
    """Read a BData HDF5 file (bdpy's layout) with h5py; a broken or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"BData file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            data_key = next((k for k in ("dataset", "dataSet") if k in f), None)
            meta_key = next((k for k in ("metadata", "metaData") if k in f), None)
            if data_key is None or meta_key is None or not {"key", "description", "value"} <= set(f[meta_key]):
                raise UserError(f"{path}: not a BData file (needs /dataset and /metadata/{{key,description,value}})")
            meta = f[meta_key]
            keys = tuple(_text(k) for k in meta["key"][()])
            descriptions = tuple(_text(d) for d in meta["description"][()])
            values = np.asarray(meta["value"][()], dtype=np.float64)
            dataset = np.asarray(f[data_key][()], dtype=np.float64)
    except OSError as exc:
        raise UserError(f"{path}: not an HDF5 file ({exc})") from None
    if dataset.ndim != 2 or values.shape != (len(keys), dataset.shape[1]) or len(descriptions) != len(keys):
        raise UserError(f"{path}: metadata {values.shape} does not describe the {dataset.shape} dataset's columns")
    return BData(path, dataset, keys, descriptions, values)


def stimulus_id(label: float) -> str:
    """``1518878.010042`` -> ``'n01518878_10042'``; a category-only label (imagery) -> ``'n01518878'``."""
    synset = int(np.floor(label))
    index = int(round((label - synset) * 1e6))
    return f"n{synset:08d}" if index == 0 else f"n{synset:08d}_{index}"


def synset_of(stimulus: str) -> str:
    """``'n01518878_10042'`` -> ``'n01518878'``."""
    return stimulus.split("_", 1)[0]


@dataclass(frozen=True)
class GODSplit:
    """One subject's samples of one split: ``betas`` (n, voxels) float32 and per-sample ids."""

    betas: np.ndarray
    stimuli: tuple[str, ...]
    """Stimulus id per sample (``n01518878_10042``; imagery: the synset)."""
    runs: np.ndarray
    """Run per sample; -1 for averaged rows."""

    @property
    def synsets(self) -> tuple[str, ...]:
        return tuple(synset_of(s) for s in self.stimuli)


def load_class_table(path: Path = CLASS_TABLE) -> dict[str, tuple[str, str]]:
    """synset -> (split, class name) from a ``synset<TAB>split<TAB>name`` table."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as exc:
        raise UserError(f"GOD class table not readable: {path} ({exc.strerror})") from None
    if not rows or not {"synset", "split", "name"} <= set(rows[0]):
        raise UserError(f"{path}: a GOD class table needs the columns synset, split, name")
    return {r["synset"]: (r["split"], r["name"]) for r in rows}


def class_names(synsets: Sequence[str], table: dict[str, tuple[str, str]], where: str = "the class table") -> list[str]:
    """Class name of each synset; any synset missing from ``table`` is one UserError naming them."""
    missing = sorted({s for s in synsets if s not in table})
    if missing:
        raise UserError(f"{len(missing)} GOD synsets have no class name in {where}: {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""))
    return [table[s][1] for s in synsets]


def _zscore(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / np.where(std > 0, std, 1.0)


class GOD:
    """The GOD release under ``root`` (``Subject{n}.h5``), its stimulus folder and class table."""

    def __init__(self, root: Path, images: Path | None = None, classes: Path = CLASS_TABLE) -> None:
        self.root, self.images_dir, self.classes_path = Path(root), images and Path(images), Path(classes)
        self._files: dict[int, BData] = {}
        self._image_index: dict[str, Path] | None = None

    def subjects(self) -> list[int]:
        """Subject numbers with a ``Subject{n}.h5`` under the root."""
        found = sorted(int(p.stem[7:]) for p in self.root.glob("Subject*.h5") if p.stem[7:].isdigit())
        if not found:
            raise UserError(f"no GOD Subject{{n}}.h5 files under {self.root}")
        return found

    def bdata(self, subject: int) -> BData:
        """The subject's BData, checked for the keys the splits need."""
        if subject not in self._files:
            data = read_bdata(self.root / f"Subject{subject}.h5")
            missing = [k for k in REQUIRED_KEYS if k not in data.keys]
            if not any(k in data.keys for k in LABEL_KEYS):
                missing.append(" or ".join(LABEL_KEYS))
            if missing:
                raise UserError(f"{data.path}: GOD metadata keys missing: {', '.join(missing)}")
            self._files[subject] = data
        return self._files[subject]

    def _label_key(self, data: BData) -> str:
        return next(k for k in LABEL_KEYS if k in data.keys)

    def _single(self, data: BData, key: str) -> np.ndarray:
        cols = data.select(key)
        if cols.shape[1] < 1:
            raise UserError(f"{data.path}: metadata key {key!r} marks no column")
        return cols[:, 0]

    def voxels(self, subject: int, rois: Sequence[str] = ("VC",)) -> np.ndarray:
        """Bool (columns,) mask of the voxel columns in any of ``rois``."""
        data = self.bdata(subject)
        unknown = [r for r in rois if f"ROI_{r}" not in data.keys]
        if unknown or not rois:
            raise UserError(f"{data.path}: unknown ROIs {unknown or list(rois)} (has: "
                            f"{', '.join(k[4:] for k in data.keys if k.startswith('ROI_'))})")
        mask = np.logical_or.reduce([data.columns(f"ROI_{r}") for r in rois]) & data.columns("VoxelData")
        if not mask.any():
            raise UserError(f"{data.path}: ROIs {list(rois)} hold no voxel")
        return mask

    def voxel_xyz(self, subject: int, rois: Sequence[str] = ("VC",)) -> np.ndarray:
        """(voxels, 3) coordinates of the ROI voxels, in the order of :meth:`split`'s columns."""
        data, mask = self.bdata(subject), self.voxels(subject, rois)
        return np.stack([data.metadata(f"voxel_{a}", mask) for a in "xyz"], 1)

    def split(self, subject: int, split: str, rois: Sequence[str] = ("VC",), normalize: str = "train",
              average: bool = True) -> GODSplit:
        """Samples of ``split`` (train / test / imagery) over ``rois``, normalised, repetitions averaged
        per image (test) or per category (imagery) unless ``average`` is False."""
        if split not in SPLITS:
            raise UserError(f"GOD split must be one of {', '.join(SPLITS)}, not {split!r}")
        if normalize not in NORMALIZE:
            raise UserError(f"normalize must be one of {', '.join(NORMALIZE)}, not {normalize!r}")
        data = self.bdata(subject)
        x = data.dataset[:, self.voxels(subject, rois)]
        kind = self._single(data, "DataType")
        runs = self._single(data, "Run").astype(np.int64)
        labels = self._single(data, self._label_key(data))
        if normalize == "train":
            train = x[kind == SPLITS["train"]]
            if len(train) < 2:
                raise UserError(f"{data.path}: fewer than 2 training samples to normalise with")
            x = _zscore(x, train.mean(0), train.std(0, ddof=1))
        elif normalize == "run":
            x = x.copy()
            # a run is (DataType, Run): nothing in the release promises run numbers unique across splits
            _, run_of = np.unique(np.stack([kind, runs], 1), axis=0, return_inverse=True)
            for r in np.unique(run_of):
                rows = run_of.ravel() == r
                x[rows] = _zscore(x[rows], x[rows].mean(0), x[rows].std(0))
        rows = kind == SPLITS[split]
        if not rows.any():
            raise UserError(f"{data.path}: no samples with DataType {SPLITS[split]} ({split})")
        stimuli = np.array([stimulus_id(v) for v in labels[rows]])
        x, runs = x[rows], runs[rows]
        if average and split != "train":
            keys = np.unique(stimuli)
            x = np.stack([x[stimuli == k].mean(0) for k in keys])
            stimuli, runs = keys, np.full(len(keys), -1)
        return GODSplit(x.astype(np.float32), tuple(str(s) for s in stimuli), runs)

    def class_names(self, synsets: Sequence[str]) -> list[str]:
        """Class names of ``synsets`` from the class table (one UserError if any is missing)."""
        return class_names(synsets, load_class_table(self.classes_path), str(self.classes_path))

    def image_paths(self, stimuli: Sequence[str]) -> list[Path]:
        """Files of ``stimuli`` in the image folder (searched recursively, stem = stimulus id);
        missing ones are one UserError with their count and the first few ids."""
        if self.images_dir is None or not self.images_dir.is_dir():
            raise UserError(f"GOD image folder not found: {self.images_dir}")
        if self._image_index is None:
            self._image_index = {p.stem: p for p in sorted(self.images_dir.rglob("*"))
                                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
        missing = [s for s in stimuli if s not in self._image_index]
        if missing:
            raise UserError(f"{len(missing)} of {len(stimuli)} GOD images not found under {self.images_dir} "
                            f"(named <stimulus id>.JPEG): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        return [self._image_index[s] for s in stimuli]

    def load_images(self, stimuli: Sequence[str], size: int = IMAGE_SIZE) -> np.ndarray:
        """(n, size, size, 3) uint8: each image centre-cropped to a square and resized (as CLIP's
        transform would crop it), so the images stack like NSD's ``imgBrick``."""
        out = np.empty((len(stimuli), size, size, 3), np.uint8)
        for i, path in enumerate(self.image_paths(stimuli)):
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
            except OSError as exc:
                raise UserError(f"GOD image not readable: {path} ({exc})") from None
            w, h = img.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            out[i] = np.asarray(img.resize((size, size), Image.BICUBIC, box=box))
        return out

    def write_image_brick(self, stimuli: Sequence[str], out: Path, size: int = IMAGE_SIZE) -> Path:
        """An HDF5 file like ``nsd_stimuli.hdf5`` (``imgBrick`` (n, size, size, 3) uint8) plus the
        ``stimulus_ids`` of its rows and their ``captions`` (n, 5): class-name prompts standing in for
        captions (BrainCLIP's text supervision), written atomically; extract-clip reads it unchanged."""
        images = self.load_images(stimuli, size)
        names = self.class_names([synset_of(s) for s in stimuli])
        with atomic_file(Path(out)) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("imgBrick", data=images, chunks=(1, size, size, 3))
            f.create_dataset("stimulus_ids", data=[s.encode() for s in stimuli])
            f.create_dataset("captions", data=[[t.format(n).encode() for t in CAPTION_TEMPLATES] for n in names])
        return Path(out)


CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.")
"""Five class-name prompts per image, the ``captions`` of the image brick (the cache keeps five per image)."""
BRICK = "god_stimuli.hdf5"
"""The image brick's file name: prepare-fmri --source god writes it beside the fMRI store's folder."""


def stimulus_order(train: Sequence[str], test: Sequence[str]) -> list[str]:
    """Row order of the GOD stimulus set (image brick, CLIP cache, store ids): the sorted training
    image ids, then the sorted test image ids (the same for every subject: all saw the same images)."""
    return sorted(set(train)) + sorted(set(test))


class GODDataset(DatasetBase):
    """GOD on the :class:`~pipeline.data.dataset.Dataset` protocol: stimuli by row of the image brick
    (:data:`BRICK` under ``root``, or ``stimuli``), categories = class names of the rows' synsets.
    Its fMRI stores are written by :func:`pipeline.data.god_store.prepare_god` (samples, not sessions)."""

    name = "god"
    split_recipe = ("GOD's DataType: training perception (150 categories) = train, test perception (50 other "
                    "categories, repetitions averaged per image) = test; imagery not used")

    def __init__(self, root: Path | str, stimuli: Path | str | None = None) -> None:
        self.root = Path(root)
        self.stimuli_path = Path(stimuli) if stimuli else (self.root if self.root.is_file() else self.root / BRICK)

    def stimulus_ids(self) -> list[str]:
        """Stimulus id of each brick row."""
        with self._brick() as f:
            if "stimulus_ids" not in f:
                raise UserError(f"{self.stimuli_path}: no 'stimulus_ids' (not a GOD image brick)")
            return [_text(s) for s in f["stimulus_ids"][()]]

    def _brick(self) -> h5py.File:
        if not self.stimuli_path.is_file():
            raise UserError(f"GOD image brick not found: {self.stimuli_path} (prepare-fmri --source god writes it)")
        return h5py.File(self.stimuli_path, "r")

    @contextmanager
    def stimuli(self) -> Iterator[h5py.Dataset]:
        """The brick's ``imgBrick`` (n, H, W, 3) uint8, rows in :func:`stimulus_order`."""
        with self._brick() as f:
            yield f["imgBrick"]

    def categories(self, image_ids: Sequence[int]) -> tuple[list[str], np.ndarray]:
        ids = self.stimulus_ids()
        of_row = class_names([synset_of(ids[int(i)]) for i in image_ids], load_class_table())
        names = sorted(set(of_row))
        labels = np.zeros((len(of_row), len(names)), bool)
        labels[np.arange(len(of_row)), [names.index(n) for n in of_row]] = True
        return names, labels
