"""Command line of the pipeline: one command per DVC stage (``python cli.py --help``)."""

import typer

from stages import (
    analyze_layers,
    compare,
    decode,
    decode_video,
    evaluate,
    evaluate_video,
    extract_clip,
    fetch_nsd,
    fit_adapters,
    make_demo,
    make_demo_god,
    make_demo_video,
    prepare_fmri,
    preset,
    prepare_video_fmri,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="NSD (images) or cc2017 (video) fMRI -> CLIP feature caches -> adapters -> reconstructions -> metrics. "
    "Options override params.yaml.",
)
app.command("make-demo")(make_demo.command)
app.command("prepare-fmri")(prepare_fmri.command)
app.command("extract-clip")(extract_clip.command)
app.command("fit-adapters")(fit_adapters.command)
app.command("decode")(decode.command)
app.command("evaluate")(evaluate.command)
app.command("analyze-layers")(analyze_layers.command)
app.command("make-demo-video")(make_demo_video.command)
app.command("prepare-video-fmri")(prepare_video_fmri.command)
app.command("decode-video")(decode_video.command)
app.command("evaluate-video")(evaluate_video.command)
app.command("make-demo-god")(make_demo_god.command)
app.command("compare")(compare.command)
app.command("fetch-nsd")(fetch_nsd.command)
app.command("preset")(preset.command)

if __name__ == "__main__":
    app()
