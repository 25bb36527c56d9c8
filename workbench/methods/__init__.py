"""Personalization methods: small classes behind a registry. The runner knows only the protocol.

A method is a frozen dataclass whose fields are its options in the preset. Its class says, once
each, what the app, the spec and the runner need to know about it (see `Method`). `attach(pipe,
study)` loads it into a pipeline and returns an Attachment; `call_kwargs(weights)` gives the
pipeline arguments for a batch (one weight per sample); `release()` leaves the pipeline as it was
found. Use it through `attached(...)`, which releases even when a batch fails. Whether one batch
may mix weights is known only once the method is loaded (a LoRA with text-encoder layers cannot),
so the attachment says it: `attachment.per_sample_weights`.

A plugin adds a method by decorating its class with `register_method("kind")` (see README, Plugins).

A method may define `neutral(weight)`: True where, at that weight, the pipeline computes exactly
what it computes with nothing attached (IP-Adapter at scale 0). Such a cell is the baseline's image,
so it shares the baseline cell's cache key and is generated once for both.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Protocol

from ..registry import register

METHODS: dict[str, type] = {}


class Attachment(Protocol):
    per_sample_weights: bool  # may one call_kwargs(weights) mix different weights? (else one weight per call)

    def call_kwargs(self, weights: list[float]) -> dict[str, Any]: ...
    def release(self) -> None: ...


class Method(Protocol):
    kind: ClassVar[str]  # set by register_method
    title: ClassVar[str]  # for people: "IP-Adapter"
    weight_option: ClassVar[str | None]  # the option naming its weight file ("adapter"); None: it takes none
    weight_file_kind: ClassVar[str | None]  # what that file is, as the app's model folders name it ("adapter")
    default_weights: ClassVar[tuple[float, ...] | None]  # None: the preset must list weights
    suggested_weights: ClassVar[tuple[float, ...] | None]  # the app form's first sweep; None: no weight to pick
    weight_range: ClassVar[tuple[float, float]]  # (low, high): other weights are refused when the study loads
    uses_references: ClassVar[bool]  # is it conditioned on subject.reference_images?

    @classmethod
    def from_options(cls, options: dict, *, base: str, base_dir, fail: Callable[[str], Exception]) -> "Method": ...
    def render_prompt(self, template: str, subject) -> str: ...
    def options(self) -> dict: ...
    def identity(self) -> dict: ...
    def attach(self, pipe, study) -> Attachment: ...


NEUTRAL_IDENTITY = {"kind": "baseline"}


def is_neutral(method, weight: float) -> bool:
    """Does `method` at `weight` leave the pipeline as if nothing were attached? (False unless it says so.)"""
    neutral = getattr(method, "neutral", None)
    return bool(neutral and neutral(weight))


METHOD_ATTRIBUTES = ("title", "weight_option", "weight_file_kind", "default_weights", "suggested_weights",
                     "weight_range", "uses_references", "from_options", "render_prompt", "options", "identity",
                     "attach")


def register_method(kind: str):
    """Class decorator: make the method class available to presets as `kind: <kind>`."""

    def decorate(cls):
        if not dataclasses.is_dataclass(cls):  # its fields are its preset options
            raise TypeError(f"method {kind!r}: decorate a @dataclass(frozen=True) class, below @register_method")
        register(METHODS, "method", kind, cls, METHOD_ATTRIBUTES, "workbench.methods.Method")
        cls.kind = kind
        return cls

    return decorate


def build_method(kind: str, options: dict, *, base: str, base_dir, fail: Callable[[str], Exception]):
    """Make a method from its preset options; unknown kinds and options fail with the known ones."""
    if kind not in METHODS:
        raise fail(f"unknown method kind {kind!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise fail(f"unknown option {sorted(map(str, unknown))[0]!r} for {kind} (known: {', '.join(sorted(known)) or 'none'})")
    return cls.from_options(options, base=base, base_dir=base_dir, fail=fail)


@contextmanager
def attached(method, pipe, study) -> Iterator[Attachment]:
    """Load `method` into `pipe` for the block; unload it in `finally`, even if a batch raised."""
    attachment = method.attach(pipe, study)
    try:
        yield attachment
    finally:
        attachment.release()


class NoState:
    """The attachment of a method that leaves nothing on the pipeline."""

    per_sample_weights = True

    def call_kwargs(self, weights):
        return {}

    def release(self):
        pass


# Registration order is the order the app lists them in.
from . import baseline, ip_adapter, lora, textual_inversion, dreambooth  # noqa: E402,F401,I001  (register)
