"""A run folder as one zip, and back: share a run, or load it into the app and continue it.

The zip holds the run folder as it is (grids, images with their PNG metadata, cells.csv,
scores.csv, summary.csv, frontier.html, manifest.json, the embedding cache) plus `study.yaml`: the
study with paths made portable (reference images copied under `references/`, tiny weights written
as `tiny`), so `parse_study(study.yaml, base_dir=<unzipped folder>)` works on another machine.
"""

from __future__ import annotations

import json
import shutil
import zipfile
import zlib
from pathlib import Path

import yaml

from .errors import StudyError
from .paths import inside
from .run_folder import MANIFEST, STUDY_FILE, RunFolder, reference_images

REFERENCES = "references"
ALLOWED_SUFFIXES = {".png", ".csv", ".json", ".html", ".yaml", ".yml", ".safetensors", ".txt"}
MAX_UNZIPPED_BYTES = 4 << 30  # an exported run of a few thousand 1024 px PNGs fits well below this
MAX_MEMBERS = 50_000
# A run's tables and texts: cells.csv of 50,000 cells is about 15 MB, frontier.html (plotly inlined) 5 MB.
MAX_TABLE_BYTES = 32 << 20
_TEXT_SUFFIXES = {".csv", ".json", ".html", ".yaml", ".yml", ".txt"}
_SKIP_SUFFIXES = (".partial", ".zip")
_STORED = (".png", ".safetensors")  # already compressed (or incompressible): store, do not deflate
_PATH_OPTIONS = ("adapter", "path", "embedding", "checkpoint")
PATH_COLUMNS = ("image",)  # the columns of a run's CSV files that name one of its files


def portable_study(study: dict, run_dir: Path) -> dict:
    """`study` (the schema of presets/) with references relative to the run folder and tiny weights as `tiny`.

    Reference images outside the run folder are copied into `run_dir/references/` first.
    """
    from .tiny import cache_root

    run_dir = Path(run_dir).resolve()
    data = json.loads(json.dumps(study))
    tiny_root = str(cache_root().resolve())
    references = []
    for index, ref in enumerate(data.get("subject", {}).get("reference_images", [])):
        path = Path(ref)
        if not path.is_absolute():
            path = run_dir / path
        path = path.resolve()
        if not path.is_relative_to(run_dir):
            target = run_dir / REFERENCES / f"{index:02d}_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and not target.exists():
                shutil.copyfile(path, target)
            path = target
        references.append(path.relative_to(run_dir).as_posix())
    if "subject" in data:
        data["subject"]["reference_images"] = references

    def untiny(value):
        return "tiny" if isinstance(value, str) and value.startswith(tiny_root) else value

    if data.get("base") in ("tiny", "tiny-xl"):
        for lora in data.get("lora", []):
            lora["path"] = untiny(lora.get("path"))
        for method in data.get("methods", []):
            for option in _PATH_OPTIONS:
                if option in method:
                    method[option] = untiny(method[option])
    return data


def zip_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `run_dir` as a zip (default: next to it, `<name>.zip`) and return its path.

    Adds `study.yaml` (see `portable_study`) when the folder has a manifest.json.
    """
    run_dir = Path(run_dir).resolve()
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise StudyError(f"{run_dir}: no manifest.json here; nothing has been generated into this run folder yet")
    manifest = RunFolder(run_dir).manifest()
    if not isinstance(manifest.get("study"), dict):
        raise StudyError(f"{manifest_path} is damaged (no readable study in it); run the study again to rewrite it")
    study = portable_study(manifest["study"], run_dir)
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}.zip"
    partial = out.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for path in sorted(run_dir.rglob("*")):
            if not path.is_file() or path.name.endswith(_SKIP_SUFFIXES) or path.name.startswith("."):
                continue
            name = path.relative_to(run_dir).as_posix()
            if name == STUDY_FILE:
                continue
            if name == "manifest.json":  # with the portable study too: every path in the zip is inside it
                archive.writestr(name, json.dumps({**manifest, "study": study}, indent=2, default=str),
                                 compress_type=zipfile.ZIP_DEFLATED)
                continue
            compression = zipfile.ZIP_STORED if path.suffix in _STORED else zipfile.ZIP_DEFLATED
            archive.write(path, name, compress_type=compression)
        archive.writestr(STUDY_FILE, yaml.safe_dump(study, sort_keys=False, allow_unicode=True),
                         compress_type=zipfile.ZIP_DEFLATED)
    partial.replace(out)
    return out


def unzip_run(zip_path: str | Path, dest: str | Path) -> Path:
    """Extract an exported run into the new folder `dest` and return it.

    Refuses (StudyError) archives that are not zips, hold paths outside the folder, files of other
    kinds than a run writes, or unpack to more than MAX_UNZIPPED_BYTES, and runs whose files name a
    path outside the folder (see `check_run_paths`); a refused archive leaves nothing behind.
    """
    dest = Path(dest).resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise StudyError(f"{Path(zip_path).name}: not a zip file ({error})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNZIPPED_BYTES:
            raise StudyError(f"{Path(zip_path).name}: too large to be an exported run "
                             f"({len(members)} files, {sum(m.file_size for m in members) / 2**30:.1f} GiB unzipped)")
        names = {m.filename for m in members}
        if STUDY_FILE not in names and "manifest.json" not in names:
            raise StudyError(f"{Path(zip_path).name}: no study.yaml or manifest.json inside; "
                             "is it a zip exported by the workbench?")
        for member in members:
            target = (dest / member.filename).resolve()
            suffix = Path(member.filename).suffix.lower()
            if not target.is_relative_to(dest) or suffix not in ALLOWED_SUFFIXES:
                raise StudyError(f"{Path(zip_path).name}: unexpected entry {member.filename!r}; "
                                 "is it a zip exported by the workbench?")
            if suffix in _TEXT_SUFFIXES and member.file_size > MAX_TABLE_BYTES:
                raise StudyError(f"{Path(zip_path).name}: {member.filename} unzips to {member.file_size >> 20} MB, "
                                 f"more than the {MAX_TABLE_BYTES >> 20} MB a run's table or text file has")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for member in members:
                target = dest / member.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            shutil.rmtree(dest, ignore_errors=True)
            raise StudyError(f"{Path(zip_path).name}: damaged zip ({error})") from None
    try:
        check_run_paths(dest, Path(zip_path).name)
    except StudyError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def zip_refusal(name: str, run_dir: Path, error: Exception) -> str:
    """One line telling a client why its zip `name` was refused, naming no server path.

    A StudyError says what is wrong; anything else that broke while reading the run (a table
    without its columns, a grid that is not an image) says the run cannot be read.
    """
    text = str(error) if isinstance(error, StudyError) else (
        f"not a run this app can read ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})")
    for folder in {str(Path(run_dir).resolve()), str(run_dir)}:
        text = text.replace(folder, name)
    text = " ".join(text.split())[:300]
    return text if text.startswith(f"{name}: ") else f"{name}: {text}"


def check_run_paths(run_dir: str | Path, name: str) -> None:
    """Refuse (StudyError) a run folder from elsewhere that names a file outside itself.

    Checked: the file columns of cells.csv, scores.csv and summary.csv (PATH_COLUMNS) and the
    reference images of study.yaml and of manifest.json's study. Nothing they name is opened.
    """
    run = RunFolder(run_dir)
    for table in ("cells.csv", "scores.csv", "summary.csv"):
        frame = run.table(table)  # as every later reader reads it (escaped text given back as written)
        for column in PATH_COLUMNS:
            if frame is None or column not in frame:
                continue
            first_row = {}  # each distinct path is checked once: a table repeats few paths many times
            for index, value in enumerate(frame[column]):
                if isinstance(value, str) and value:
                    first_row.setdefault(value, index)
            for value, index in first_row.items():
                inside(run_dir, value, f"{name}: {table}: {column}[{index}]", "the zip")
    for source, study in run.stored_studies().items():
        for index, ref in enumerate(reference_images(study)):
            inside(run_dir, ref, f"{name}: {source}: subject.reference_images[{index}]", "the zip")


def saved_study(run_dir: str | Path) -> dict:
    """The study of a run folder (study.yaml, else the manifest's), with paths portable to this folder."""
    studies = RunFolder(run_dir).stored_studies()
    if STUDY_FILE in studies:
        return studies[STUDY_FILE]
    if MANIFEST in studies:
        return portable_study(studies[MANIFEST], Path(run_dir))
    raise StudyError(f"{run_dir}: no study.yaml or manifest.json; not a run folder")
