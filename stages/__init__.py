"""One thin module per DVC stage: read parameters (params.yaml, overridden by CLI options),
call :mod:`pipeline`, write outputs. ``cli.py`` registers each module's ``command``."""
