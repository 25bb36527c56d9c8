"""Paths that come from a client (an uploaded run, a form, a saved file's rows): inside their folder, or refused."""

from __future__ import annotations

from pathlib import Path

from .errors import StudyError


def inside(root: str | Path, path: str | Path, field: str, within: str = "") -> Path:
    """`path` (relative to `root`, or absolute) resolved, when it lies inside `root`; else StudyError naming `field`.

    `within` names `root` in the message (default: its folder name).

    Links are resolved first, so one inside `root` that points out is refused too. Nothing is read:
    the answer is the same for a file that exists and one that does not, so a refusal tells a client
    nothing about the server's files.
    """
    root = Path(root).resolve()
    text = str(path)
    resolved = (root / text).resolve() if text and "\x00" not in text else None
    if resolved is None or not resolved.is_relative_to(root):
        raise StudyError(f"{field}: {text!r} is outside {within or root.name + '/'}; name a file inside it")
    return resolved
