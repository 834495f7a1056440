"""lcpaq command line: thin wrappers over library functions, one module per command group.

Each command module defines its commands on :data:`lcpaq.cli._app.app` at import time;
:func:`register_all` imports them (lazily, so ``import lcpaq`` stays light).
"""

from __future__ import annotations

import importlib

from lcpaq.cli._app import app, emit_json, entry, main

# One entry per command module. Add yours here.
COMMAND_MODULES = (
    "lcpaq.cli.foundation",  # models, inspect, cost
    "lcpaq.cli.proxy",  # finetune, tune
    "lcpaq.cli.profiler",  # profile, tables, predict
    "lcpaq.cli.search",  # search
    "lcpaq.cli.sensitivity",  # sensitivity
    "lcpaq.cli.deploy",  # validate, export, demo
)

_registered = False


def register_all() -> None:
    global _registered
    if _registered:
        return
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    _registered = True


__all__ = ["app", "emit_json", "entry", "main", "register_all"]
