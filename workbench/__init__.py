"""Personalization workbench: compare text-to-image personalization methods over a sweep of weights.

The public API, imported on first use (so `import workbench` stays cheap):

    from workbench import load_study, run_study
    result = run_study(load_study("presets/tiny.yaml"), "runs/tiny")

- studies: `load_study(path)`, `parse_study(data)`; running and rescoring: `run_study`, `score_run`;
  reading a run folder back: `RunFolder`
- registries: `METHODS` / `register_method`, `METRICS` / `register_metric`, `BACKBONES` /
  `register_backbone`; plugins that add to them: `load_plugins`
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "load_study": "spec", "parse_study": "spec",
    "run_study": "runner", "score_run": "runner",
    "RunFolder": "run_folder",
    "METHODS": "methods", "register_method": "methods",
    "METRICS": "metrics", "register_metric": "metrics",
    "BACKBONES": "metrics", "register_backbone": "metrics",
    "load_plugins": "plugins",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    home = f"{__name__}.{_EXPORTS[name]}"
    try:
        value = getattr(import_module(home), name)
    except ModuleNotFoundError as error:
        if error.name != home:
            raise
        raise AttributeError(f"module 'workbench' has no attribute {name!r} ({home} is not installed)") from None
    globals()[name] = value  # found once, then a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
