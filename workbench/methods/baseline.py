from __future__ import annotations

from dataclasses import dataclass

from . import NEUTRAL_IDENTITY, NoState, register_method
from .common import fill_prompt


@register_method("baseline")
@dataclass(frozen=True)
class Baseline:
    """Text only: the prompt names the class, no identifier token, nothing attached. The control column."""

    title = "Baseline (text only)"
    weight_option = weight_file_kind = None
    default_weights = (0.0,)
    suggested_weights = None  # nothing to pick: the baseline has no weight
    weight_range = (0.0, 0.0)
    uses_references = False

    @classmethod
    def from_options(cls, options, **_):
        return cls()

    def render_prompt(self, template, subject):
        return fill_prompt(template, "", subject.class_noun)

    def options(self):
        return {}

    def identity(self):
        return dict(NEUTRAL_IDENTITY)

    def neutral(self, weight):
        return True

    def attach(self, pipe, study):
        return NoState()
