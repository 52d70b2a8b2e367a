"""evaluate on a GOD run (:mod:`pipeline.data.god_store` stores): the zero-shot protocol of BrainCLIP /
Lite-Mind (:func:`pipeline.evaluation.god_zeroshot.god_zeroshot`) instead of the NSD reconstruction
metrics -> ``metrics.json`` with ``protocol: god-zeroshot``.

Each test prediction (``test/image_embeds``, repetitions averaged) is classified among the held-out
test classes (text embeddings of their class-name prompts through the CLIP model of the run's cache)
and retrieved among the test images' cached ``image_embeds``. The held-out classes are checked
against the store's training ids (no test synset has a training image). No reconstruction is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..data.god import load_class_table
from ..decoding import decode
from ..errors import UserError
from ..features.cache import load_cache_model, open_cache
from ..fitting.run_folder import RunInfo
from ..store import write_text
from .god_zeroshot import class_text_embeddings, god_zeroshot, held_out_classes


def evaluate_god_run(run: Path, info: RunInfo, groups: dict, device: str) -> dict[str, Any]:
    """GOD zero-shot metrics of every subject of ``run`` (mean over subjects at the top level)."""
    stores = list(info.stores().values())
    clip = open_cache(Path(info.clip))
    loaded = load_cache_model(clip.attrs, device)
    table = load_class_table()
    per: dict[str, dict[str, Any]] = {}
    for (key, (preds, test_ids)), path in zip(groups.items(), stores):
        attrs = zarr.open_group(path, mode="r").attrs
        ids = list(attrs["stimulus_ids"])
        train_rows = zarr.open_group(path, mode="r")["train/image_ids"][...]
        test = [ids[int(i)] for i in test_ids]
        held = held_out_classes([ids[int(i)] for i in np.unique(train_rows)], test)
        missing = [s for s in held if s not in table]
        if missing:
            raise UserError(f"{len(missing)} held-out GOD synsets have no class name: {', '.join(missing[:5])}")
        if "test/image_embeds" not in preds:
            raise UserError(f"{run}: the GOD protocol needs predicted image_embeds (fit the run with that target)")
        class_emb = class_text_embeddings(loaded, [table[s][1] for s in held], device=device)
        image = decode.take_rows(clip["image_embeds"], test_ids).reshape(len(test_ids), -1)
        pred = preds["test/image_embeds"][...].reshape(len(test_ids), -1)
        result = god_zeroshot(pred, test, class_emb, held, image_emb=image)
        result["held_out_classes"] = [table[s][1] for s in held]
        result["n_train_rows"] = int(len(train_rows))
        per["all" if key is None else key] = result
    out: dict[str, Any] = {"protocol": "god-zeroshot", "method": info.method, "clip": info.clip,
                           "prompts": "class-name prompts over CLIP's 80 ImageNet templates, averaged"}
    first = next(iter(per.values()))
    for name, value in first.items():
        if isinstance(value, float):
            out[name] = float(np.mean([r[name] for r in per.values()]))
    if len(per) > 1 or "all" not in per:
        out["subjects"] = per
    else:
        out.update({k: v for k, v in first.items() if k not in out})
    write_text(run / "metrics.json", json.dumps(out, indent=2))
    return out
