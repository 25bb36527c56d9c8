"""Text shared by the study and the methods: prompt filling, weight-source text, field length limits.

A leaf: it imports no other part of the workbench but `weights`, so `spec` and `methods` can both use it.
"""

from __future__ import annotations

from .weights import WeightSource

TEXT_LIMITS = {"name": 200, "description": 5000, "prompt": 1000, "negative_prompt": 1000, "token": 100,
               "class_noun": 100, "label": 100}  # characters


def fill(template: str, token: str, class_noun: str) -> str:
    """`template` with {subject} and {class} replaced, on one line with single spaces."""
    text = template.replace("{subject}", token).replace("{class}", class_noun)
    return " ".join(text.split())


def source_text(source: WeightSource) -> str:
    """A weight source as a preset writes it: repo[@revision][:filename]."""
    text = source.repo + (f"@{source.revision}" if source.revision else "")
    return text + (f":{source.filename}" if source.filename else "")
