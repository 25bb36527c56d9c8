"""Where weight files come from (hub `repo:path`, local .safetensors, `tiny`) and what identifies them."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import StudyError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class WeightSource:
    """A weight file or repo: `repo` (hub id or local folder) and optional `filename` inside it."""

    repo: str
    filename: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.repo).exists()

    @property
    def local_file(self) -> Path | None:
        if not self.is_local:
            return None
        path = Path(self.repo) / self.filename if self.filename else Path(self.repo)
        return path if path.is_file() else None


def refuse_pickle(name: str, field: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise StudyError(
            f"{field}: {name} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "it is refused unopened. Convert it to .safetensors (e.g. with safetensors' convert script) and point to that"
        )


def check_safetensors(path: str | os.PathLike, field: str) -> None:
    """Refuse a file that is not a well-formed .safetensors, reading only its header (never unpickling).

    Checks the 8-byte little-endian header length, that the header is a JSON object, and that every
    tensor's data lies inside the file, so a damaged, truncated or renamed file fails here, with the
    field's name, instead of as a SafetensorError deep inside a loader.
    """
    path = Path(path)
    reason = _safetensors_problem(path)
    if reason:
        raise StudyError(f"{field}: {path} is not a valid .safetensors file ({reason}); "
                         "re-download or re-convert it")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if _looks_pickled(head):
            return "it looks like a pickle or torch.save file renamed; refused unopened"
        if len(head) < 8:
            return f"{size} bytes, too short for a header"
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            return f"invalid header length {length} for a file of {size} bytes"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            return f"tensor {name!r} lies outside the file's {data_bytes} data bytes: truncated?"
    return _safetensors_layout_problem(path)


def _safetensors_layout_problem(path: Path) -> str | None:
    """What safetensors itself says of the header (dtypes, shapes against their bytes, overlaps), if anything.

    Opening maps the file and parses the header without reading a tensor.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except SafetensorError as error:
        return str(error).splitlines()[0]


def _looks_pickled(head: bytes) -> bool:
    """A zip (what torch.save writes) or a pickle of protocol 2 to 5, by its first bytes."""
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def check_weight_folder(folder: str | os.PathLike, field: str) -> None:
    """Check every .safetensors under `folder`, and refuse pickle weights that loaders would open.

    diffusers and transformers open a pickle (`torch.load(weights_only=True)`) only when no
    .safetensors sits beside it, so a pickle alone in its folder is refused unopened; one with a
    .safetensors twin is left alone, as the loaders read the twin.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path, field)
        elif path.name.lower().endswith(PICKLE_SUFFIXES) and not any(path.parent.glob("*.safetensors")):
            raise StudyError(
                f"{field}: {folder} holds pickle weights ({path.relative_to(folder)}) with no .safetensors beside "
                "them; loading would unpickle them, so the folder is refused unopened. Convert them to "
                ".safetensors (e.g. save_pretrained(..., safe_serialization=True)) and point to that")


def parse_weight_source(text: str, field: str, base_dir: Path | None = None) -> WeightSource:
    """Parse `repo[@revision][:path/in/repo]`, a local file, or a local folder.

    Local paths are tried as given and relative to `base_dir` (the preset's folder and its parent).
    Pickle formats are refused by name, never opened.
    """
    text = str(text).strip()
    if not text:
        raise StudyError(f"{field}: empty weight reference")
    local = _find_local(text, base_dir)
    if local is not None:
        refuse_pickle(local.name, field)
        if local.is_file() and local.suffix != ".safetensors":
            raise StudyError(f"{field}: {local} is not a .safetensors file")
        if local.is_file():
            check_safetensors(local, field)
        else:
            check_weight_folder(local, field)
        return WeightSource(str(local))
    repo, _, filename = text.partition(":")
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if filename:
        refuse_pickle(filename, field)
        local_repo = _find_local(repo, base_dir)
        if local_repo is not None:
            if not (local_repo / filename).is_file():
                raise StudyError(f"{field}: {local_repo / filename} does not exist")
            if filename.endswith(".safetensors"):
                check_safetensors(local_repo / filename, field)
            return WeightSource(str(local_repo), filename)
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".safetensors") and "/" not in repo
    if looks_local or repo.count("/") != 1:
        raise StudyError(f"{field}: {text!r} is neither an existing local file/folder nor a hub id 'owner/name'")
    return WeightSource(repo, filename or None, revision)


def _find_local(text: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(text).expanduser()]
    if base_dir is not None and not Path(text).is_absolute():
        candidates += [base_dir / text, base_dir.parent / text]
    return next((c.resolve() for c in candidates if _exists(c)), None)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name longer than the filesystem allows: not a local file, so a hub id or an error
        return False


@lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime) so multi-GB checkpoints hash once."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def _outside_hidden_folders(relative: Path) -> bool:
    return not any(part.startswith(".") for part in relative.parts[:-1])


def tree_sha256(root: str | os.PathLike, keep=_outside_hidden_folders) -> str:
    """sha256 over the files under `root` that `keep(relative path)` accepts: their names and contents.

    By default every file outside hidden folders."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if keep(relative):
            digest.update(relative.as_posix().encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def source_identity(source: WeightSource) -> dict:
    """What identifies the bytes behind a source: sha256 for local files, id@revision for hub ones."""
    if source.is_local:
        root = Path(source.repo)
        if source.local_file:
            name = source.local_file.relative_to(root) if root.is_dir() else Path(source.local_file.name)
            digest = hashlib.sha256(name.as_posix().encode() + sha256_file(source.local_file).encode()).hexdigest()
        else:  # a weight folder: the files a loader reads
            digest = tree_sha256(root, keep=lambda relative: relative.suffix in (".safetensors", ".json", ".txt"))
        return {"local": str(root), "file": source.filename, "sha256": digest}
    return {"hub": source.repo, "file": source.filename, "revision": resolved_revision(source)}


def resolved_revision(source: WeightSource) -> str:
    """The commit the local HF cache holds for a hub source, else the requested revision (or 'main')."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(source.repo, revision=source.revision, local_files_only=True)
        return Path(path).name
    except Exception:
        return source.revision or "main"


def missing_model_message(source: WeightSource | str, field: str) -> str:
    repo = source.repo if isinstance(source, WeightSource) else source
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded"
    return (
        f"{field}: model {repo!r} is not in the local Hugging Face cache and {why}. "
        f"On a machine with network run `huggingface-cli download {repo}` (or point to a local .safetensors file)"
    )
