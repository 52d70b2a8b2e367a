"""NSD images' COCO categories: :func:`coco_categories` reads them from ``instances_<cocoSplit>.json``
(found through the image's ``cocoId``) as a multi-hot (n, K) matrix over the union of the files'
categories. The demo writes these files with its planted shape classes. Fitting reads them to hold
categories out of training; evaluation for zero-shot category decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from ..errors import UserError
from .nsd import NSD


def coco_categories(nsd: NSD, image_ids: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Category names (K,) and a multi-hot (n, K) bool matrix for 0-based 73k ``image_ids``."""
    info = nsd.stim_info
    ids = np.asarray(image_ids, dtype=np.int64)
    unknown = np.setdiff1d(ids, info.index.to_numpy())
    if unknown.size:
        raise UserError(f"image ids {unknown[:5].tolist()} are not in {nsd.stim_info_path}")
    rows = info.loc[ids, ["cocoId", "cocoSplit"]]
    names: dict[int, str] = {}
    labels: dict[tuple[str, int], set[int]] = {}
    for split in sorted(rows["cocoSplit"].unique()):
        path = nsd.annotations_path("instances", split)
        if not path.is_file():
            raise UserError(f"COCO instances file not found: {path}")
        try:
            doc = json.loads(path.read_text())
            names.update({int(c["id"]): str(c["name"]) for c in doc["categories"]})
            for ann in doc["annotations"]:
                labels.setdefault((split, int(ann["image_id"])), set()).add(int(ann["category_id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a COCO instances file ({type(exc).__name__}: {exc})") from None
    if not names:
        raise UserError(f"no categories in the COCO instances files under {nsd.annotations_path('instances', '*').parent}")
    cat_ids = sorted(names)
    column = {c: j for j, c in enumerate(cat_ids)}
    hot = np.zeros((len(ids), len(cat_ids)), bool)
    for row, (coco_id, split) in enumerate(rows.itertuples(index=False)):
        for c in labels.get((split, int(coco_id)), ()):
            hot[row, column[c]] = True
    return [names[c] for c in cat_ids], hot
