from __future__ import annotations

from dataclasses import dataclass

from . import NEUTRAL_IDENTITY, NoState, register_method
from .common import fill_prompt


@register_method("baseline")
@dataclass(frozen=True)
class Baseline:
    """Text only: the prompt names the class, no identifier token, nothing attached. The control column."""

    default_weights = (0.0,)
    weight_range = (0.0, 0.0)  # the baseline has no weight
    uses_references = False
    per_sample_weights = True

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
