"""Registering a plugin inside a test without leaking it into the next test."""

import sys
from contextlib import contextmanager


@contextmanager
def restored_registries(*plugin_modules: str):
    """The method, metric and backbone registries as they were, and `plugin_modules` unimported, afterwards."""
    from workbench.methods import METHODS
    from workbench.metrics import BACKBONES, METRICS

    saved = [(registry, dict(registry)) for registry in (METHODS, METRICS, BACKBONES)]
    try:
        yield
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)
        for name in plugin_modules:
            sys.modules.pop(name, None)
