"""Adding a class to a registry by name (methods, metrics, backbones): one check for all three."""

from __future__ import annotations


def register(registry: dict[str, type], what: str, name: str, cls: type, required: tuple[str, ...],
             protocol: str) -> None:
    """Put `cls` in `registry` under `name`, after checking it declares every attribute in `required`.

    Refuses a second class under a name already taken: presets and runs would mean different things
    depending on which plugin was imported last. The same class registering again (its module
    reloaded) replaces itself.
    """
    missing = [attribute for attribute in required if not hasattr(cls, attribute)]
    if missing:
        raise TypeError(f"{what} {name!r} ({cls.__module__}.{cls.__qualname__}) does not declare "
                        f"{', '.join(missing)}; see {protocol}")
    old = registry.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"{what} {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    registry[name] = cls
