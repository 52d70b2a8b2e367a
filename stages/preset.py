"""``preset NAME``: write a named set of settings (``presets/<name>.yaml``) into params.yaml, e.g. ``nsd``
to switch the demo's settings to real NSD / cc2017 data, ``demo`` to switch back (see the README)."""

from __future__ import annotations

from pathlib import Path

import typer

from .params import user_errors
from .settings import PARAMS_FILE, PRESETS, apply_preset, load_params


@user_errors
def command(
    name: str = typer.Argument(..., help="A preset in presets/: demo (the tiny look-alikes) | nsd (real NSD and cc2017)."),
    params: Path = typer.Option(PARAMS_FILE, help="The params file to update."),
) -> None:
    """Apply a named preset to params.yaml (its comments are not kept: `git diff params.yaml` shows the change)."""
    import yaml

    from pipeline.errors import UserError
    from pipeline.store import write_text

    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise UserError(f"no preset {name!r} (presets/ holds: {known})")
    merged = apply_preset(load_params(params), load_params(path))
    write_text(params, yaml.safe_dump(merged, sort_keys=False, default_flow_style=False, width=110))
    typer.echo(f"wrote {params} with preset {name}")
