"""Pieces shared by method classes: option parsing and prompt filling."""

from __future__ import annotations

from ..text import fill as _fill
from ..weights import WeightSource, parse_weight_source, source_identity


def weight_source_option(value, name: str, *, kind: str, base: str, base_dir, fail) -> WeightSource:
    """Parse a weight-file option; `tiny` means the tiny resource of that kind for a tiny base."""
    if value is None:
        raise fail(f"{name} is required")
    text = str(value)
    if text == "tiny":
        from ..tiny import resolve_tiny

        try:
            text = resolve_tiny(kind, base)
        except ValueError as error:
            raise fail(f"{name}: {error}") from None
    try:
        return parse_weight_source(text, name, base_dir)
    except Exception as error:  # StudyError names the option; prefix the method
        raise fail(str(error)) from None


def fill_prompt(template: str, token: str, class_noun: str) -> str:
    return _fill(template, token, class_noun)


def source_text(source: WeightSource) -> str:
    from ..text import source_text as _source_text

    return _source_text(source)


__all__ = ["weight_source_option", "fill_prompt", "source_identity", "source_text"]
