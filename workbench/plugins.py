"""Plugins: modules that register methods, metrics or backbones when imported, without a fork.

A plugin is any importable module whose import calls `register_method`, `register_metric` or
`register_backbone` (examples/plugins/brightness.py). `load_plugins` imports, in this order:

1. every entry point of the group `workbench.plugins` of the installed packages
   (pyproject.toml: `[project.entry-points."workbench.plugins"] brightness = "my_package.brightness"`);
2. the modules named in $WORKBENCH_PLUGINS, comma-separated (how the app is given plugins);
3. the modules passed in (the CLI's `--plugin MODULE`, repeatable).

Import a plugin before its method or metric is used: before the study is parsed (a preset naming
its method kind) and before the scorer is made (`--metrics` naming its metric).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Iterable

from .errors import StudyError

ENTRY_POINT_GROUP = "workbench.plugins"
ENVIRONMENT_VARIABLE = "WORKBENCH_PLUGINS"


class PluginError(StudyError):
    """A plugin that does not import. A StudyError, so the CLI and the app show it as one line."""


def load_plugins(modules: Iterable[str] = (), *, environment: bool = True, installed: bool = True) -> list[str]:
    """Import the installed plugins, those in $WORKBENCH_PLUGINS, and `modules`; return the names imported.

    Importing a module twice is a no-op, so calling this again (the CLI, then the app) is harmless.
    Raises PluginError naming the module and where it was named when one fails to import.
    """
    loaded = []
    if installed:
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            _import(entry_point.value, f"entry point {entry_point.name!r} of group {ENTRY_POINT_GROUP}",
                    entry_point.load)
            loaded.append(entry_point.value)
    named = [(name, ENVIRONMENT_VARIABLE) for name in _split(os.environ.get(ENVIRONMENT_VARIABLE, ""))
             if environment]
    named += [(name, "--plugin") for name in modules]
    for name, where in named:
        _import(name, where, lambda name=name: importlib.import_module(name))
        loaded.append(name)
    return loaded


def _split(names: str) -> list[str]:
    return [name.strip() for name in names.split(",") if name.strip()]


def _import(name: str, where: str, load) -> None:
    try:
        load()
    except Exception as error:  # one line for any failure inside the plugin's import, not a traceback
        first_line = (str(error).strip().splitlines() or [""])[0]
        if isinstance(error, ModuleNotFoundError) and error.name and (name + ".").startswith(error.name + "."):
            reason = "no such module (is it on the Python path? run from the folder that holds it)"
        else:
            reason = f"{type(error).__name__}: {first_line}"
        raise PluginError(f"{where}: plugin {name!r} does not import: {reason}") from error
