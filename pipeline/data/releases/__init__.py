"""Readers for the preprocessed NSD releases users hold (MindEye2, MindEye1, Brain-Diffuser).

Each writes the fMRI store prepare-fmri writes from raw NSD (:func:`prepare_release`), and reads its
stimuli by 0-based 73k id (:mod:`.stimuli`).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from .brain_diffuser import prepare_brain_diffuser
from .mindeye1 import prepare_mindeye1
from .mindeye2 import prepare_mindeye2

PREPARERS = {
    "mindeye2": prepare_mindeye2,
    "mindeye1": prepare_mindeye1,
    "brain-diffuser": prepare_brain_diffuser,
}
"""``prepare-fmri --source`` values other than ``nsd`` (raw NSD: :func:`pipeline.data.fmri.prepare_fmri`)."""

DEFAULT_ZSCORE = {"mindeye2": "train", "mindeye1": "session", "brain-diffuser": "none"}
"""The one ``--zscore`` each release can give (its own normalisation)."""


def prepare_release(
    source: str,
    root: Path | str,
    subject: int,
    out: Path | str,
    *,
    zscore: str | None = None,
    repeats: str = "mean",
    test_set: str = "new",
    sessions: int | None = None,
    rois_from: Path | str | None = None,
) -> Path:
    """The fMRI store of ``subject`` from the release ``source`` found at ``root``.

    ``zscore`` None = the release's own (:data:`DEFAULT_ZSCORE`); any other is a one-line error.
    ``test_set`` (``new``/``old``) and ``sessions`` apply to MindEye2 only; ``rois_from`` (a raw NSD
    root with the subject's ROI NIfTIs) adds ``voxels/<roi>`` labels and ``voxels/ijk``.
    """
    if source not in PREPARERS:
        raise UserError(f"--source must be nsd or one of {', '.join(PREPARERS)}, not {source!r}")
    options = {"zscore": zscore or DEFAULT_ZSCORE[source], "repeats": repeats, "rois_from": rois_from}
    if source == "mindeye2":
        options.update(test_set=test_set, sessions=sessions)
    elif sessions is not None or test_set != "new":
        raise UserError(f"--sessions and --test-set apply to --source mindeye2 only, not {source}")
    return PREPARERS[source](root, subject, out, **options)
