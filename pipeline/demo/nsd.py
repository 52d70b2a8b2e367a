"""make-demo: a miniature NSD look-alike with a planted, hierarchical encoding model.

Same relative paths, file formats, dtypes, 1-based ids and axis orders as the real release
(shared/reference/nsd.md), only smaller. Betas are generated from CLIP features of the images
themselves, computed with the project's tiny open_clip ViT (trained contrastively on the demo's own
images and captions at make-demo time, :mod:`.tower`; weights saved next to the data):

- ``prf-visualrois`` voxels respond to the tokens of an intermediate block (``mid_block``),
- ``floc-*`` voxels respond to the final embedding (``encode_image``),
- other ``nsdgeneral`` voxels respond to neither (noise only),

each through a subject-specific linear read-out of the features; the ``floc`` voxels (the levels in
``code_levels``) also through a subject-specific mixing of one *shared*, strongly non-linear code of
them (random Fourier features, the same for every subject; ``code_share`` of the signal variance).
The prf voxels get no such code on purpose: a non-linear function of block-3 tokens is predicted
linearly better by block 4 than by block 3 itself, which would hide the planted hierarchy from
analyze-layers (measured: the prf best layer moved from 3 to 4). The shared code is what makes cross-subject
transfer real: a model pre-trained on several subjects has learned to decode it, so a new subject
only needs its linear mixing, which one session suffices to fit (issue 11's measurements: a tanh
of a linear map of the features is nearly linear at this scale and gave no transfer; random Fourier
features did). ``code_share`` 0.5 keeps half of the signal linear, so the single-subject methods
keep decoding it as before. Subjects
(``subjects``, NSD numbers 1, 2, 5, 7 by default) differ in voxel count (their volumes differ by a
voxel in X or Y) and in sessions,

plus independent trial noise (so repeats differ), a per-session offset and gain per voxel (so
z-scoring matters) and a few voxels that are 0 for a whole session (invalid there). The planted
weights and noise level are saved in ``demo/planted.npz`` so tests can compute the ceiling.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io
import torch
from safetensors.torch import save_file

from ..data.nsd import NSD, NSDLayout
from ..features import clip
from .tower import TowerTraining, train_tower

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "diamond", "dots")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
CAPTION_TEMPLATES = (
    "a {fg} {shape} on a {bg} background",
    "a picture of a {fg} {shape}",
    "a {shape} drawn in {fg} over {bg}",
    "{fg} {shape} in front of a plain {bg} wall",
    "a simple {shape} shape coloured {fg}",
    "an image showing one {fg} {shape}",
)
ROI_TABLES = {
    "nsdgeneral": ["nsdgeneral"],
    "prf-visualrois": ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"],
    "prf-eccrois": ["ecc0pt5", "ecc1", "ecc2", "ecc4", "ecc4+"],
    "floc-faces": ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"],
    "floc-bodies": ["EBA", "FBA-1", "FBA-2", "mTL-bodies"],
    "floc-places": ["OPA", "PPA", "RSC"],
    "floc-words": ["OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"],
    "streams": ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"],
}
FLOC = ("floc-faces", "floc-bodies", "floc-places", "floc-words")
VOLUME_STEPS = ((0, 0, 0), (-1, 0, 0), (0, -1, 1), (-1, 1, 0))
"""Per subject (in order), its volume minus the first subject's: 692, 630, 742, 720 nsdgeneral voxels at 14x16x12."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the look-alike; defaults run the whole demo pipeline in minutes on 2 CPU cores."""

    n_images: int = 520  # the "73k" pool
    image_size: int = 64  # NSD is 425; every reader resizes anyway
    subjects: tuple[int, ...] = (1, 2, 5, 7)  # NSD subject numbers written
    sessions: tuple[int, ...] = (4, 3, 4, 5)  # per subject of `subjects`; subject 2 has fewer, like subj03/04/06/08
    trials_per_session: int = 96  # NSD: 750
    n_shared: int = 40  # NSD: 1000 (each 10k index appears 3x in masterordering)
    volume: tuple[int, int, int] = (14, 16, 12)  # (X, Y, Z) of the first subject; NSD subj01: 81x104x83
    brain_scale: float = 1.0  # brain radius / half the volume; 0.44 at 81x104x83: 15,196 nsdgeneral voxels (NSD subj01: ~15.7k)
    noise: float = 0.7  # trial noise sd, relative to a unit-variance planted signal
    amplitude: float = 2.0  # percent signal change of one signal sd
    invalid_fraction: float = 0.02  # nsdgeneral voxels zeroed for one whole session
    model: str = "nsd-tiny-vit"
    mid_block: int = 3  # the "intermediate" layer prf voxels see (1-based)
    code_dim: int = 32  # width of the shared non-linear code (per hierarchy level)
    code_bandwidth: float = 2.0  # phase sd of its random Fourier features: larger is more non-linear
    code_share: float = 0.5  # fraction of a planted voxel's signal variance that comes from the shared code
    code_levels: tuple[str, ...] = ("final",)  # hierarchy levels that get it (see the module docstring)
    seed: int = 0
    nifti_subjects: tuple[int, ...] = (1,)  # subjects that also get .nii.gz betas (all get .hdf5)
    tower: TowerTraining = TowerTraining()  # CLIP training of the tiny model (epochs=0: random weights)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sessions) != len(self.subjects) or len(set(self.subjects)) != len(self.subjects):
            raise ValueError("sessions needs one count per subject, and subjects must be distinct")
        if min(self.subjects) < 1 or max(self.subjects) > 8:
            raise ValueError("NSD subjects are numbered 1..8")

    @property
    def n_10k(self) -> int:
        return max(self.sessions) * self.trials_per_session // 3

    def volume_of(self, subject: int) -> tuple[int, int, int]:
        """Each subject's (X, Y, Z): the first subject's, a voxel smaller or larger along one axis or
        two, so voxel counts differ like NSD's."""
        step = VOLUME_STEPS[self.subjects.index(subject) % len(VOLUME_STEPS)]
        return tuple(int(a + b) for a, b in zip(self.volume, step, strict=True))


# ---- images and captions ----------------------------------------------------------------------------
def draw_image(rng: np.random.Generator, size: int, shape: str, fg: str, bg: str) -> np.ndarray:
    """One (size, size, 3) uint8 picture of a coloured shape on a plain, slightly noisy background."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.15, 0.3)
    dx, dy = xx - cx, yy - cy
    masks = {
        "circle": dx**2 + dy**2 < r**2,
        "square": (abs(dx) < r) & (abs(dy) < r),
        "triangle": (dy < r) & (dy > -r) & (abs(dx) < (dy + r) / 2),
        "cross": ((abs(dx) < r / 3) & (abs(dy) < r)) | ((abs(dy) < r / 3) & (abs(dx) < r)),
        "ring": (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (0.6 * r) ** 2),
        "stripes": (np.sin((xx + yy) * rng.uniform(15, 30)) > 0.3),
        "diamond": abs(dx) + abs(dy) < r,
        "dots": (np.sin(xx * 40) > 0.7) & (np.sin(yy * 40) > 0.7),
    }
    img = np.empty((size, size, 3), np.float64)
    img[:] = COLOURS[bg]
    img[masks[shape]] = COLOURS[fg]
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(cfg: DemoConfig, rng: np.random.Generator) -> tuple[np.ndarray, pd.DataFrame]:
    """The image pool and its planted attributes (class = shape, colours)."""
    names = list(COLOURS)
    rows, images = [], np.empty((cfg.n_images, cfg.image_size, cfg.image_size, 3), np.uint8)
    for i in range(cfg.n_images):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.choice(names, 2, replace=False)
        images[i] = draw_image(rng, cfg.image_size, shape, fg, bg)
        rows.append({"shape": shape, "fg": fg, "bg": bg})
    return images, pd.DataFrame(rows)


def captions_for(attrs: pd.Series, rng: np.random.Generator) -> list[str]:
    n = int(rng.choice([5, 5, 5, 6]))  # COCO has 5 captions per image, sometimes more
    picks = rng.choice(len(CAPTION_TEMPLATES), n, replace=False)
    return [CAPTION_TEMPLATES[p].format(**attrs) for p in picks]


# ---- volumes --------------------------------------------------------------------------------------
def make_rois(shape: tuple[int, int, int], brain_scale: float = 1.0) -> dict[str, np.ndarray]:
    """ROI volumes with the NSD value convention: -1 outside cortex, 0 unlabelled cortex, 1..N labels.

    The cortex is an ellipsoid shell whose radii are ``brain_scale`` times half the volume."""
    i, j, k = np.indices(shape, dtype=np.float64)
    c = (np.array(shape) - 1) / 2
    rad = np.array(shape) / 2 * brain_scale
    d = np.sqrt(((i - c[0]) / rad[0]) ** 2 + ((j - c[1]) / rad[1]) ** 2 + ((k - c[2]) / rad[2]) ** 2)
    cortex = (d <= 1.0) & (d >= 0.55)
    y = (j - c[1] + rad[1] - 0.5) / (2 * rad[1])  # 0 = posterior edge of the brain (j / shape[1] at scale 1)
    general = cortex & (y < 0.55)
    early = general & (y < 0.25)
    ventral = general & (y >= 0.28) & (k < c[2] + 0.5)
    left, front = i < c[0], y >= 0.42

    def volume(sel: np.ndarray, labels: np.ndarray) -> np.ndarray:
        vol = np.where(cortex, 0.0, -1.0)
        vol[sel] = labels[sel]
        return vol

    angle = np.arctan2(k - c[2], i - c[0])
    depth = np.floor((j - j[ventral].min()) % 5) if ventral.any() else j
    floc_sel = {
        "floc-faces": ventral & left & ~front, "floc-bodies": ventral & ~left & ~front,
        "floc-places": ventral & left & front, "floc-words": ventral & ~left & front,
    }
    rois = {
        "nsdgeneral": volume(general, np.ones(shape)),
        "prf-visualrois": volume(early, np.floor((angle + np.pi) / (2 * np.pi) * 7 - 1e-9) + 1),
        "prf-eccrois": volume(early, np.minimum(np.floor(y / 0.05), 4) + 1),
        "streams": volume(general, np.where(early, 1, np.where(ventral, 5, np.where(k >= c[2], 7, 6)))),
    }
    for name, sel in floc_sel.items():
        rois[name] = volume(sel, depth % len(ROI_TABLES[name]) + 1)
    return rois


def write_ctab(path: Path, names: list[str]) -> None:
    """FreeSurfer label table: ``0 Unknown``, then ``<n> <name>`` with a trailing tab.

    Real NSD names carry trailing whitespace; a tab alone keeps two space-separated fields per
    line, which the common ``pd.read_csv(f, delimiter=' ', header=None, index_col=0)`` (nsd_access)
    reads, as it does NSD's nsdgeneral / HCP_MMP1 tables (tab + spaces, as in NSD's Kastner2015
    table, breaks it: nsd_access issue #7).
    """
    lines = ["0 Unknown"] + [f"{n} {name}\t" for n, name in enumerate(names, start=1)]
    path.write_text("\n".join(lines) + "\n")


def _save_nifti(path: Path, data: np.ndarray, tr: float | None = None) -> None:
    img = nib.Nifti1Image(data, np.diag([1.8, 1.8, 1.8, 1.0]))
    img.header.set_zooms((1.8, 1.8, 1.8, tr) if tr else (1.8, 1.8, 1.8))
    nib.save(img, path)


# ---- experiment design ----------------------------------------------------------------------------
def make_design(cfg: DemoConfig, n_subjects: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``masterordering``/``subjectim``/``sharedix`` with NSD's conventions (1-based, float64).
    ``subjectim`` has a row per subject number up to the largest written; rows of subjects that
    are not written repeat the first written subject's (they have no betas)."""
    n10k, n_total = cfg.n_10k, max(cfg.sessions) * cfg.trials_per_session
    if n_total != 3 * n10k:
        raise ValueError("max(sessions) * trials_per_session must be a multiple of 3")
    order = np.repeat(np.arange(1, n10k + 1), 3)
    rng.shuffle(order)
    need = cfg.n_shared + n_subjects * (n10k - cfg.n_shared)
    if need > cfg.n_images:
        raise ValueError(f"n_images must be >= {need} for this design")
    pool = rng.permutation(cfg.n_images) + 1  # 1-based 73k ids
    shared = pool[: cfg.n_shared]
    subjectim = np.zeros((max(cfg.subjects), n10k), np.float64)
    for s in range(n_subjects):
        own = pool[cfg.n_shared + s * (n10k - cfg.n_shared):][: n10k - cfg.n_shared]
        subjectim[cfg.subjects[s] - 1] = np.concatenate([shared, own])
    for s in set(range(1, max(cfg.subjects) + 1)) - set(cfg.subjects):
        subjectim[s - 1] = subjectim[cfg.subjects[0] - 1]
    return {
        "masterordering": order[None, :].astype(np.float64),
        "subjectim": subjectim,
        "sharedix": shared[None, :].astype(np.float64),
        "basiccnt": np.zeros((3, max(cfg.sessions))),  # placeholders, as in NSD (meaning unverified)
        "stimpattern": np.zeros((max(cfg.sessions), 12, 75)),
    }


# ---- the planted encoding model ----------------------------------------------------------------------
def planted_features(cfg: DemoConfig, images: np.ndarray, weights: Path) -> dict[str, np.ndarray]:
    """Intermediate-block tokens (flattened) and final embeddings of every image, z-scored per feature."""
    loaded = clip.load_model(cfg.model, str(weights))
    layer = clip.parse_layers(str(cfg.mid_block), loaded.n_blocks)
    mids, finals = [], []
    for start in range(0, len(images), 64):
        px = clip.preprocess_batch(loaded, images[start : start + 64])
        tokens, embeds = clip.encode_layers(loaded, px, layer, clip.TokenMode("all"))
        mids.append(tokens[layer[0].name].flatten(1).numpy())
        finals.append(embeds.numpy())
    feats = {"mid": np.concatenate(mids), "final": np.concatenate(finals)}
    return {k: (v - v.mean(0)) / (v.std(0) + 1e-8) for k, v in feats.items()}


def shared_code(feats: np.ndarray, dim: int, bandwidth: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Random Fourier features ``cos(F W + b)`` of z-scored features (phase sd ``bandwidth``), z-scored:
    one strongly non-linear code of the image, the same for every subject."""
    w = rng.normal(size=(feats.shape[1], dim)) * bandwidth / np.sqrt(feats.shape[1])
    b = rng.uniform(0, 2 * np.pi, dim)
    code = np.cos(feats @ w + b)
    return (code - code.mean(0)) / (code.std(0) + 1e-8), {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def planted_signal(feats: np.ndarray, n_vox: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random linear read-out of features, scaled so each voxel's signal has unit variance over images."""
    w = rng.normal(size=(feats.shape[1], n_vox))
    sig = feats @ w
    scale = sig.std(0)
    return sig / scale, w / scale


def make_demo(out: Path | str, cfg: DemoConfig = DemoConfig()) -> Path:
    """Write the look-alike under ``out`` (an NSD root); see the module docstring."""
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    n_subjects = len(cfg.subjects)
    root = NSDLayout(out)
    extras = out / "demo"
    extras.mkdir(parents=True, exist_ok=True)

    # stimuli, metadata, captions
    images, attrs = make_images(cfg, rng)
    root.stimuli_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(root.stimuli_path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, *images.shape[1:]))
    design = make_design(cfg, n_subjects, rng)
    root.expdesign_path.parent.mkdir(parents=True, exist_ok=True)
    _write_mat(root.expdesign_path, design)
    coco_ids = rng.choice(np.arange(1, 600_000), cfg.n_images, replace=False)
    split = np.where(rng.random(cfg.n_images) < 0.85, "train2017", "val2017")
    _write_stim_info(root, cfg, design, coco_ids, split)
    _write_coco(root, attrs, images, coco_ids, split, rng)
    _write_responses(root, cfg, design)

    # tiny CLIP weights (the demo's "pretrained" model, trained on its own captions) and the planted features
    torch.manual_seed(cfg.seed)
    loaded = clip.load_model(cfg.model, "none")
    tower_history = train_tower(loaded, images, NSD(out).captions(np.arange(cfg.n_images)), cfg.tower, cfg.seed)
    model = loaded.model
    weights = extras / f"{cfg.model}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    feats = planted_features(cfg, images, weights)
    codes, code_maps = {}, {}
    for level in cfg.code_levels:
        codes[level], maps = shared_code(feats[level], cfg.code_dim, cfg.code_bandwidth, rng)
        code_maps.update({f"code_{level}_{k}": v for k, v in maps.items()})

    # subjects: ROIs, betas
    planted: dict[str, np.ndarray] = dict(code_maps)
    for s in cfg.subjects:
        planted.update(_write_subject(root, cfg, s, design, make_rois(cfg.volume_of(s), cfg.brain_scale), feats, codes, rng))

    np.savez_compressed(extras / "planted.npz", **planted, noise=cfg.noise, amplitude=cfg.amplitude)
    (extras / "planted.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "features": {
                    "mid": f"block {cfg.mid_block} output, all tokens flattened, z-scored over images",
                    "final": "encode_image (image_embeds), z-scored over images",
                },
                "voxels": "prf-visualrois > 0 -> mid features; any floc-* > 0 -> final features; "
                "other nsdgeneral voxels -> none",
                "shared_code": "per level of code_levels, code = zscore(cos(features @ code_<level>_w + code_<level>_b)), "
                "the same for every subject; signal = zscore(sqrt(1 - code_share) * zscore(features @ w_<level>) + "
                "sqrt(code_share) * zscore(code @ m_<level>)) with subject-specific w and m; other levels: "
                "signal = zscore(features @ w_<level>)",
                "response": "psc = offset[session, v] + gain[session, v] * amplitude * "
                "(signal[image, v] + noise * N(0, 1)); signal has unit variance over images",
                "ceiling": "per-voxel r^2 of the signal with the mean of r repeats = 1 / (1 + noise^2 / r)",
                "weights": f"{weights.name} (random init, seed {cfg.seed}, then {cfg.tower.epochs} epochs of "
                "CLIP training on the demo's images and captions); the model config is "
                f"pipeline/model_configs/{cfg.model}.json",
                "tower_training": tower_history,
                "classes": list(SHAPES),
            },
            indent=2,
        )
    )
    return out


MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, Platform: posix, written by nsd-feature-cache make-demo"
"""Header text of the demo's .mat file, fixed: scipy writes the current time there, which would make
every regenerated demo differ (and every clone's ``dvc repro`` look changed)."""


def _write_mat(path: Path, variables: dict[str, np.ndarray]) -> None:
    """``scipy.io.savemat`` (MATLAB 5 format) with the 116-byte header text replaced by a fixed one."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    data = bytearray(buf.getvalue())
    data[:116] = MAT_DESCRIPTION.ljust(116)
    path.write_bytes(bytes(data))


def _write_stim_info(root: NSDLayout, cfg: DemoConfig, design: dict, coco_ids: np.ndarray, split: np.ndarray) -> None:
    n = cfg.n_images
    df = pd.DataFrame(
        {
            "cocoId": coco_ids,
            "cocoSplit": split,
            "cropBox": ["(0, 0, 0.125, 0.125)"] * n,
            "loss": np.zeros(n),
            "nsdId": np.arange(n),
            "flagged": np.zeros(n, bool),
            "BOLD5000": np.zeros(n, bool),
            "shared1000": np.isin(np.arange(n) + 1, design["sharedix"]),
        }
    )
    order = design["masterordering"].ravel().astype(int)
    reps = {}
    for s in range(1, 9):
        seen = np.zeros(n, int)
        rep = np.zeros((n, 3), int)
        if s in cfg.subjects:
            n_trials = cfg.sessions[cfg.subjects.index(s)] * cfg.trials_per_session
            ids = design["subjectim"][s - 1, order[:n_trials] - 1].astype(int) - 1
            for trial, img in enumerate(ids):
                rep[img, seen[img]] = trial + 1  # 1-based global trial number
                seen[img] += 1
        df[f"subject{s}"] = (seen > 0).astype(int)
        for r in range(3):
            reps[f"subject{s}_rep{r}"] = rep[:, r]
    df = pd.concat([df, pd.DataFrame(reps)], axis=1)
    df.to_csv(root.stim_info_path)  # unnamed 0-based index column first, as in NSD


COCO_SIZE = (640, 480)
"""(width, height) of every demo image's "original" COCO image: the stimulus is its centre square
(``cropBox`` (0, 0, 0.125, 0.125) crops 12.5% of the width on each side), resized."""


def _shape_bbox(image: np.ndarray, fg: str, bg: str) -> list[float]:
    """COCO ``[x, y, w, h]`` of the shape (pixels nearer the foreground colour than the background),
    in the coordinates of the original COCO image."""
    px = image.astype(np.float64)
    near_fg = ((px - COLOURS[fg]) ** 2).sum(-1) < ((px - COLOURS[bg]) ** 2).sum(-1)
    rows, cols = np.nonzero(near_fg) if near_fg.any() else (np.arange(image.shape[0]), np.arange(image.shape[1]))
    width, height = COCO_SIZE
    scale = height / image.shape[0]  # the crop is height x height, starting at x = (width - height) / 2
    x0, y0 = (width - height) / 2 + cols.min() * scale, rows.min() * scale
    return [round(x0, 2), round(y0, 2), round((cols.max() + 1 - cols.min()) * scale, 2),
            round((rows.max() + 1 - rows.min()) * scale, 2)]


def _write_coco(
    root: NSDLayout, attrs: pd.DataFrame, images: np.ndarray, coco_ids: np.ndarray, split: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """``captions_*`` and ``instances_*`` json with COCO's schema: captions files have no
    ``categories`` (pycocotools would index them as instances), instances carry ``bbox``, ``area``,
    ``iscrowd`` and a ``segmentation`` (the bbox rectangle); annotation ids are unique across files."""
    root.annotations_path("captions", "train2017").parent.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    width, height = COCO_SIZE
    next_id = {"captions": 1, "instances": 1}
    for sp in ("train2017", "val2017"):
        idx = np.flatnonzero(split == sp)
        info = {"description": f"nsd-feature-cache demo ({sp})", "version": "1.0", "year": 2017}
        coco_images = [{"id": int(coco_ids[i]), "file_name": f"{coco_ids[i]:012d}.jpg", "width": width,
                        "height": height, "license": 0} for i in idx]
        caps, inst = [], []
        for i in idx:
            for text in captions_for(attrs.iloc[i], rng):
                caps.append({"id": next_id["captions"], "image_id": int(coco_ids[i]), "caption": text})
                next_id["captions"] += 1
            x, y, w, h = _shape_bbox(images[i], attrs.iloc[i]["fg"], attrs.iloc[i]["bg"])
            inst.append({"id": next_id["instances"], "image_id": int(coco_ids[i]),
                         "category_id": SHAPES.index(attrs.iloc[i]["shape"]) + 1, "bbox": [x, y, w, h],
                         "area": round(w * h, 2), "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            next_id["instances"] += 1
        docs = {
            "captions": {"info": info, "licenses": [], "images": coco_images, "annotations": caps},
            "instances": {"info": info, "licenses": [], "images": coco_images, "annotations": inst,
                          "categories": categories},
        }
        for kind, doc in docs.items():
            root.annotations_path(kind, sp).write_text(json.dumps(doc))


def _write_responses(root: NSDLayout, cfg: DemoConfig, design: dict) -> None:
    """``responses.tsv`` (NSD manual, "Behavioral data"): design columns plus a simulated old/new
    recognition task whose answers are right 80% of the time.

    ISOLD / ISOLDCURRENT: the image was shown on an earlier trial (any session / this session);
    MEMORYRECENT / MEMORYFIRST: stimulus trials between this and the most recent / first earlier
    showing (NaN when novel); TIME: trial onset in days since midnight of session 1's day
    (sessions a week apart, runs of 5 min); RT in ms; one press per trial (BUTTON 1 = "new",
    2 = "old": a demo convention, NSD's button mapping is not documented here; TOTAL1/TOTAL2 count
    presses of each). Responses use their own random stream, so the rest of the demo does not
    depend on them.
    """
    order = design["masterordering"].ravel().astype(int)
    per_run = -(-cfg.trials_per_session // 12)
    for s, n_sess in zip(cfg.subjects, cfg.sessions, strict=True):
        rng = np.random.default_rng([cfg.seed, 12, s])
        t = np.arange(n_sess * cfg.trials_per_session)
        k = t % cfg.trials_per_session
        session, run, trial = t // cfg.trials_per_session + 1, k // per_run + 1, k % per_run + 1
        ids = design["subjectim"][s - 1, order[t] - 1].astype(int)
        first, last, first_in_session = {}, {}, {}
        is_old, is_old_current = np.zeros(len(t), int), np.zeros(len(t), int)
        recent, since_first = np.full(len(t), np.nan), np.full(len(t), np.nan)
        for i, (img, sess) in enumerate(zip(ids, session)):
            if img in last:
                is_old[i], recent[i], since_first[i] = 1, i - last[img] - 1, i - first[img] - 1
            is_old_current[i] = int((img, sess) in first_in_session)
            first.setdefault(img, i)
            first_in_session.setdefault((img, sess), i)
            last[img] = i
        says_old = np.where(rng.random(len(t)) < 0.8, is_old, 1 - is_old)
        onset_s = 9 * 3600 + (run - 1) * 360 + 3 + (trial - 1) * 4  # runs start at 9:00, 6 min apart, 4-s trials
        button = says_old + 1
        cols = {
            "SUBJECT": s, "SESSION": session, "RUN": run, "TRIAL": trial, "73KID": ids, "10KID": order[t],
            "TIME": (session - 1) * 7 + onset_s / 86400, "ISOLD": is_old, "ISCORRECT": (says_old == is_old).astype(int),
            "RT": np.round(rng.lognormal(np.log(900), 0.25, len(t)), 1), "CHANGEMIND": 0,
            "MEMORYRECENT": recent, "MEMORYFIRST": since_first, "ISOLDCURRENT": is_old_current,
            "ISCORRECTCURRENT": (says_old == is_old_current).astype(int), "TOTAL1": (button == 1).astype(int),
            "TOTAL2": (button == 2).astype(int), "BUTTON": button, "MISSINGDATA": 0,
        }
        path = root.root / f"nsddata/ppdata/subj{s:02d}/behav/responses.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(cols).to_csv(path, sep="\t", index=False)


def _write_subject(
    root: NSDLayout, cfg: DemoConfig, s: int, design: dict, rois: dict[str, np.ndarray],
    feats: dict[str, np.ndarray], codes: dict[str, np.ndarray], rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    for name, vol in rois.items():
        path = root.roi_path(s, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_nifti(path, vol.astype(np.float64))
        for ctab in (root.ctab_path(s, name), root.root / f"nsddata/freesurfer/fsaverage/label/{name}.mgz.ctab"):
            ctab.parent.mkdir(parents=True, exist_ok=True)  # NSD has the tables under fsaverage/label too
            write_ctab(ctab, ROI_TABLES[name])
    brain = rois["nsdgeneral"] > -1
    brain |= np.pad(brain[1:], ((0, 1), (0, 0), (0, 0))) | np.pad(brain[:-1], ((1, 0), (0, 0), (0, 0)))
    _save_nifti(root.root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/brainmask.nii.gz", brain.astype(np.int16))

    vox = np.argwhere(brain)  # every brain voxel gets a beta; C order over (X, Y, Z)
    general = rois["nsdgeneral"][brain] == 1
    prf = general & (rois["prf-visualrois"][brain] > 0)
    floc = general & np.any([rois[n][brain] > 0 for n in FLOC], axis=0)
    signal = np.zeros((cfg.n_images, len(vox)), np.float64)
    weights = {}
    for level, sel in (("mid", prf), ("final", floc)):
        linear, weights[f"w_{level}"] = planted_signal(feats[level], int(sel.sum()), rng)
        if level not in codes:
            signal[:, sel] = linear
            continue
        mixed, weights[f"m_{level}"] = planted_signal(codes[level], int(sel.sum()), rng)
        both = np.sqrt(1 - cfg.code_share) * linear + np.sqrt(cfg.code_share) * mixed
        signal[:, sel] = both / both.std(0)
    volume = cfg.volume_of(s)

    order = design["masterordering"].ravel().astype(int)
    n_t = cfg.trials_per_session
    bdir = root.betas_dir(s)
    bdir.mkdir(parents=True, exist_ok=True)
    for sess in range(1, cfg.sessions[cfg.subjects.index(s)] + 1):
        t = np.arange((sess - 1) * n_t, sess * n_t)
        ids = design["subjectim"][s - 1, order[t] - 1].astype(int) - 1
        offset = rng.normal(0, 1.0, len(vox))
        gain = rng.uniform(0.6, 1.4, len(vox))
        resp = signal[ids] + cfg.noise * rng.normal(size=(n_t, len(vox)))
        psc = offset + gain * cfg.amplitude * resp
        dead = np.flatnonzero(general)[rng.random(int(general.sum())) < cfg.invalid_fraction]
        psc[:, dead] = 0.0  # outside this session's field of view
        vol = np.zeros((*volume, n_t), np.int16)
        vol[brain] = np.clip(np.rint(psc * 300), -32768, 32767).astype(np.int16).T
        if s in cfg.nifti_subjects:
            _save_nifti(root.betas_path(s, sess, "nifti"), vol, tr=1.333)
        with h5py.File(root.betas_path(s, sess, "hdf5"), "w") as f:
            f.create_dataset("betas", data=vol.transpose(3, 2, 1, 0), chunks=(n_t, 1, 1, 1))
    key = f"subj{s:02d}"
    return {f"{key}_prf_ijk": vox[prf], f"{key}_floc_ijk": vox[floc],
            **{f"{key}_{name}": w.astype(np.float32) for name, w in weights.items()}}
