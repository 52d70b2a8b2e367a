"""DVC stages ``extract_clip`` and ``extract_video``: every stimulus -> per-layer CLIP tokens in
``cache/clip/<model>__<pretrained>.zarr`` (see :mod:`pipeline.features.extract`), or, with ``--video``,
every (segment, TR) clip of a cc2017 movie folder -> ``cache/clip/cc2017__<model>__<pretrained>.zarr``
(see :mod:`pipeline.features.video`; settings from params.yaml ``extract_video`` and ``cc2017_design``).
The store's settings (:class:`pipeline.features.spec.ClipSpec`) come from the stage's section, how it
runs (:class:`pipeline.features.spec.Execution`: batch size, device, workers) from ``execution``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.errors import UserError

from .params import device_option, user_errors
from .settings import require, resolve, section


def default_out(model: str, pretrained: str) -> Path:
    """``cache/clip/<model>__<pretrained>.zarr``, with file names reduced to their stem."""
    def short(value: str) -> str:
        return Path(value).stem if Path(value).suffix else value

    return Path("cache/clip") / f"{short(model)}__{short(pretrained)}.zarr"


@user_errors
def command(
    stimuli: Optional[Path] = typer.Option(
        None, help="nsd_stimuli.hdf5, or the NSD root holding it (needed for captions, shared, subject:N) "
        "(params: extract_clip.stimuli); with --source, the release's root or image file."),
    source: Optional[str] = typer.Option(
        None, help="nsd | mindeye2 | mindeye1 | brain-diffuser: whose images --stimuli holds; rows stay 0-based "
        "73k ids; MindEye1 and Brain-Diffuser keep images per subject: --images subject:N (default: nsd)."),
    out: Optional[Path] = typer.Option(None, help="Output store (default: cache/clip/<model>__<pretrained>.zarr)."),
    model: Optional[str] = typer.Option(None, help="open_clip architecture name or a model-config JSON (default: ViT-L-14)."),
    pretrained: Optional[str] = typer.Option(
        None, help="open_clip pretrained tag, a checkpoint file (state_dict: torch.save or .safetensors) "
        "or none (default: openai)."),
    activation: Optional[str] = typer.Option(
        None, help="auto (the weights' own: QuickGELU for OpenAI's) | gelu | quick_gelu; a choice that "
        "contradicts the tag is refused (default: auto)."),
    layers: Optional[str] = typer.Option(
        None, help="1-based blocks, range aggregates and projected blocks, e.g. 8,16,24,11-20:mean,24:proj "
        "(default: 8,16,24)."),
    tokens: Optional[str] = typer.Option(None, help="all | cls | mean | grid:K | merge:K (default: all)."),
    images: Optional[str] = typer.Option(
        None, help="Rows to fill: all | shared | subject:N | A-B (0-based ids, inclusive); rounded out to "
        "whole shards (default: all)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass (default: 64)."),
    device: Optional[str] = device_option(),
    dtype: Optional[str] = typer.Option(
        None, help="Compute precision: auto (float16 on GPU, float32 on CPU) | float16 | bfloat16 | float32; "
        "layers are always stored float16."),
    captions: Optional[bool] = typer.Option(
        None, "--captions/--no-captions", help="Write text_embeds of the COCO captions (default: when present)."),
    shard_rows: Optional[int] = typer.Option(None, help="Images per shard: one file per array and the unit of "
                                             "work and resume (default: 1024)."),
    chunk_rows: Optional[int] = typer.Option(None, help="Images per layer chunk (default: as many as fit in 1 MiB)."),
    loader_workers: Optional[int] = typer.Option(
        None, help="Processes reading and preprocessing images (default: 0 on CPU, up to 8 on GPU)."),
    workers: Optional[int] = typer.Option(None, help="Run on a local dask cluster of N worker processes (one per GPU)."),
    scheduler: Optional[str] = typer.Option(None, help="Run on a dask.distributed scheduler, e.g. tcp://host:8786."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Rebuild a store made with other settings (default: refuse). Same settings resume."),
    video: Optional[Path] = typer.Option(
        None, help="Extract the movie clips of this cc2017 root (or its stimuli/ folder) instead of NSD images; "
        "settings then come from params.yaml extract_video."),
    fps: Optional[float] = typer.Option(None, help="--video: frames per second kept; fps x TR frames per clip (default: 3)."),
    keyframe: Optional[int] = typer.Option(None, help="--video: 1-based frame of each clip that is its keyframe "
                                           "(default: the middle one, 3 of 6)."),
    frame_size: Optional[int] = typer.Option(None, help="--video: size of the cached small frames (default: 64)."),
    vae: Optional[str] = typer.Option(None, help="--video: also cache the frames' latents of this AutoencoderKL "
                                      "(folder or hub id, or a Stable Diffusion pipeline with a vae/)."),
) -> None:
    """Cache per-layer CLIP tokens, image and caption embeddings of every stimulus (resumable)."""
    common = dict(out=out, model=model, pretrained=pretrained, activation=activation, layers=layers, tokens=tokens,
                  batch_size=batch_size, device=device, dtype=dtype, shard_rows=shard_rows, chunk_rows=chunk_rows,
                  loader_workers=loader_workers, workers=workers, scheduler=scheduler)
    report = lambda line: typer.echo(line, err=True)  # noqa: E731
    if video is not None:
        for name, value in (("stimuli", stimuli), ("source", source), ("images", images), ("captions", captions)):
            if value is not None:
                raise UserError(f"--{name} applies to NSD images, not to --video")
        target = _extract_video(video, overwrite, report, **common, fps=fps, keyframe=keyframe, frame_size=frame_size,
                                vae=vae)
    else:
        if any(v is not None for v in (fps, keyframe, frame_size, vae)):
            raise UserError("--fps, --keyframe, --frame-size and --vae apply to --video")
        target = _extract_images(overwrite, report, **common, stimuli=stimuli, source=source, images=images,
                                  captions=captions)
    typer.echo(f"wrote {target}")


def _extract_images(overwrite: bool, report: Callable[[str], None], **options: Any) -> Path:
    from pipeline.features.extract import extract_clip  # imports torch: only when run
    from pipeline.features.spec import ClipSpec, Execution, pick

    p = resolve("extract_clip", **options)  # params.yaml extract_clip and execution.extract_clip
    require(p, "extract_clip", "stimuli")
    spec = pick(ClipSpec, p)
    target = Path(p.get("out") or default_out(spec.model, spec.pretrained))
    source = p.get("source", "nsd")
    # params.yaml's captions setting is NSD's (COCO annotations); a release takes only the command line's
    captions = p.get("captions") if source == "nsd" else options.get("captions")
    return extract_clip(p["stimuli"], target, spec, pick(Execution, p), source=source, images=p.get("images", "all"),
                        captions=captions, overwrite=overwrite, report=report)


def _extract_video(video: Path, overwrite: bool, report: Callable[[str], None], **options: Any) -> Path:
    from pipeline.data.cc2017 import Design
    from pipeline.features.spec import ClipSpec, Execution, pick
    from pipeline.features.video import VideoSpec, extract_video  # imports torch: only when run

    p = resolve("extract_video", **options)  # params.yaml extract_video and execution.extract_video
    spec = pick(ClipSpec, p)
    default = default_out(spec.model, spec.pretrained)
    target = Path(p.get("out") or default.with_name(f"cc2017__{default.name}"))
    return extract_video(video, target, spec, pick(Execution, p), video=pick(VideoSpec, p), overwrite=overwrite,
                         design=Design.from_params(section("cc2017_design")), report=report)
