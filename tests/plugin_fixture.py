"""A plugin for the tests: one method and one metric the package does not ship, registered on import.

`python -m workbench run PRESET --plugin tests.plugin_fixture` (from the repository root) must show
them in the outputs with no edit to the package.
"""

from dataclasses import dataclass

from workbench.methods import NoState, register_method
from workbench.metrics import register_metric
from workbench.methods.common import fill_prompt


@register_method("token_only")
@dataclass(frozen=True)
class TokenOnly:
    """The identifier token in the prompt and nothing attached: what the token alone does."""

    title = "Token only (no weights)"
    weight_option = weight_file_kind = None
    default_weights = (0.0,)
    suggested_weights = None
    weight_range = (0.0, 0.0)
    uses_references = False

    @classmethod
    def from_options(cls, options, **_):
        return cls()

    def render_prompt(self, template, subject):
        return fill_prompt(template, subject.token, subject.class_noun)

    def options(self):
        return {}

    def identity(self):
        return {"kind": "token_only"}

    def attach(self, pipe, study):
        return NoState()


@register_metric("seed_spread")
class SeedSpread:
    """Per group of seeds: the largest (1 - cosine) between two of its DINO embeddings, in [0, 2]."""

    label = "seed spread"
    axis = "diversity"
    direction = "higher is better"
    scale = "max 1 - cosine in [0, 2]"
    level = "group"
    backbone = "dino"
    needs = ("dino_image",)

    def score_group(self, generated):
        rows = generated["dino_image"]
        return float("nan") if len(rows) < 2 else float(1 - (rows @ rows.T).min())
