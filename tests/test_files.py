"""Files: broken weight files, pickle folders, atomic outputs, read-only or full disks, two writers."""

import errno
import io
import json
import pickle
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_study

from workbench.errors import StudyError
from workbench.runner import run_study
from workbench.spec import parse_study


def _garbage_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 16) + b"this is not json" + b"\0" * 64)


def _invalid_header_length(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")


def _renamed_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"emb_params": [0.0] * 32}, protocol=4))


def _truncated(path: Path) -> None:
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 40)


def _header_only(path: Path, header: dict, data_bytes: int) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * data_bytes)


def _unknown_dtype(path: Path) -> None:
    _header_only(path, {"w": {"dtype": "ZZZ", "shape": [1], "data_offsets": [0, 4]}}, 4)


def _shape_larger_than_its_bytes(path: Path) -> None:
    _header_only(path, {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4]}}, 4)


def _overlapping_tensors(path: Path) -> None:
    _header_only(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4)


BROKEN = {"garbage header": _garbage_header, "invalid header length": _invalid_header_length,
          "renamed pickle": _renamed_pickle, "truncated": _truncated, "unknown dtype": _unknown_dtype,
          "shape larger than its bytes": _shape_larger_than_its_bytes, "overlapping tensors": _overlapping_tensors}

# Where a weight file is accepted, and the field the error must name.
FIELDS = {
    "adapter": (lambda p: {"methods": [{"kind": "ip_adapter", "adapter": p, "weights": [0.5]}]},
                r"methods\[0\]: adapter: "),
    "embedding": (lambda p: {"methods": [{"kind": "textual_inversion", "embedding": p}]}, r"methods\[0\]: embedding: "),
    "checkpoint": (lambda p: {"methods": [{"kind": "dreambooth", "checkpoint": p}]}, r"methods\[0\]: checkpoint: "),
    "base": (lambda p: {"base": p}, r"base: "),
    "lora": (lambda p: {"methods": [{"kind": "lora", "path": p, "weights": [1.0]}]}, r"methods\[0\]: path: "),
    "study lora": (lambda p: {"lora": [{"path": p, "weight": 0.5}]}, r"lora\[0\]\.path: "),
}


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("field", FIELDS)
def test_a_broken_safetensors_file_is_refused_naming_the_field(tmp_path, field, broken):
    weights = tmp_path / "weights.safetensors"
    BROKEN[broken](weights)
    overrides, named = FIELDS[field]
    invalid = r"weights\.safetensors is not a valid \.safetensors file"
    with pytest.raises(StudyError, match=rf"^(<study>: )?{named}.*{invalid}") as refused:
        parse_study(tiny_study(**overrides(str(weights))))
    assert "\n" not in str(refused.value)


def test_a_renamed_pickle_is_called_a_pickle_and_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    weights = tmp_path / "weights.safetensors"
    _renamed_pickle(weights)
    with pytest.raises(StudyError, match=r"looks like a pickle .*renamed"):
        parse_study(tiny_study(methods=[{"kind": "lora", "path": str(weights), "weights": [1.0]}]))


def _copy_tiny_pipeline(tmp_path) -> Path:
    from workbench.tiny import tiny_dreambooth

    return Path(shutil.copytree(tiny_dreambooth("tiny"), tmp_path / "checkpoint"))


def test_a_broken_safetensors_inside_a_weight_folder_is_refused(tmp_path):
    folder = _copy_tiny_pipeline(tmp_path)
    _garbage_header(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(StudyError, match=r"methods\[0\]: checkpoint: .*unet/diffusion_pytorch_model\.safetensors "
                                         r"is not a valid \.safetensors file"):
        parse_study(tiny_study(methods=[{"kind": "dreambooth", "checkpoint": str(folder)}]))


def _no_torch_load(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))


@pytest.mark.parametrize("field", ["checkpoint", "base", "lora"])
def test_a_folder_holding_only_pickle_weights_is_refused_unopened(tmp_path, monkeypatch, field):
    _no_torch_load(monkeypatch)
    if field == "lora":
        folder = tmp_path / "lora"
        folder.mkdir()
        (folder / "pytorch_lora_weights.bin").write_bytes(pickle.dumps({}))
        data, named = {"methods": [{"kind": "lora", "path": str(folder), "weights": [1.0]}]}, r"methods\[0\]: path: "
    else:
        folder = _copy_tiny_pipeline(tmp_path)
        unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
        unet.rename(unet.with_suffix(".bin"))
        data, named = FIELDS[field][0](str(folder)), FIELDS[field][1]
    with pytest.raises(StudyError, match=rf"^(<study>: )?{named}.*holds pickle weights .*refused unopened"):
        parse_study(tiny_study(**data))


def test_a_folder_with_a_safetensors_twin_loads_without_opening_the_pickle(tmp_path, monkeypatch):
    _no_torch_load(monkeypatch)
    folder = _copy_tiny_pipeline(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({}))
    study = parse_study(tiny_study(seeds=[0], methods=[{"kind": "dreambooth", "checkpoint": str(folder)}]))
    result = run_study(study, tmp_path / "run", show_progress_bar=False, score=False)
    assert result.complete and result.generated == 1


# --- outputs ------------------------------------------------------------------------------------


def _fail_writes_to(monkeypatch, name: str, after: int = 10):
    """Opening a file whose name holds `name` for writing gives one that fills the disk after `after` bytes."""
    real_open = io.open

    class FullDisk(io.FileIO):
        def write(self, data):
            room = max(0, after - self.tell())
            if len(data) > room:
                super().write(bytes(data[:room]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def fake_open(file, mode="r", *args, **kwargs):
        if name in str(file) and any(m in mode for m in "wax+"):
            raw = FullDisk(file, mode.replace("t", "").replace("b", ""))
            return raw if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr("builtins.open", fake_open)


def test_a_full_disk_while_writing_the_manifest_keeps_the_previous_one_and_a_rerun_works(tmp_path, tiny_base,
                                                                                         monkeypatch):
    run = tmp_path / "run"
    run_study(parse_study(tiny_study(seeds=[0])), run, loaded=tiny_base, show_progress_bar=False, score=False)
    before = (run / "manifest.json").read_text()
    with monkeypatch.context() as patch:
        _fail_writes_to(patch, "manifest.json")
        with pytest.raises(StudyError, match=rf"^{run}: .*manifest\.json.*No space left on device"):
            run_study(parse_study(tiny_study(seeds=[0, 1])), run, loaded=tiny_base, show_progress_bar=False,
                      score=False)
    assert (run / "manifest.json").read_text() == before
    assert not [p for p in run.rglob("*") if "partial" in p.name]
    rerun = run_study(parse_study(tiny_study(seeds=[0, 1])), run, loaded=tiny_base, show_progress_bar=False,
                      score=False)
    assert rerun.complete and rerun.generated == 0  # seed 1 was finished before the manifest failed
    assert len(json.loads((run / "manifest.json").read_text())["runs"]) == 2


def test_a_full_disk_while_generating_keeps_finished_images_and_names_the_folder(tmp_path, tiny_base, monkeypatch):
    from PIL import Image

    run = tmp_path / "run"
    study = parse_study(tiny_study(seeds=[0, 1, 2]))
    real_save, saved = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", save)
        with pytest.raises(StudyError, match=rf"^{run}: cannot write .*No space left on device") as refused:
            run_study(study, run, loaded=tiny_base, show_progress_bar=False, score=False)
    assert "\n" not in str(refused.value)
    assert len(list(run.glob("images/*/*.png"))) == 1
    rerun = run_study(study, run, loaded=tiny_base, show_progress_bar=False, score=False)
    assert rerun.complete and rerun.generated == 2


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_base):
    study = parse_study(tiny_study())
    run = tmp_path_factory.mktemp("scored") / "run"
    run_study(study, run, loaded=tiny_base, show_progress_bar=False)
    return study, run


DAMAGE = {"empty": b"", "corrupt": b"\x00\xff{not what it should be,,\n\"\n"}
# JSON that parses but is not the manifest's shape (a hand edit, another tool's file)
MISSHAPEN_MANIFESTS = {"runs not a list": b'{"study": NaN, "runs": 5}', "a run not a mapping": b'{"runs": ["x"]}',
                       "a list": b"[1, 2]", "methods not a mapping": b'{"runs": [{"methods": 3}]}'}


@pytest.mark.parametrize("content", MISSHAPEN_MANIFESTS)
def test_a_manifest_of_another_shape_does_not_block_a_rerun(scored_run, tmp_path, tiny_base, content):
    study, original = scored_run
    run = Path(shutil.copytree(original, tmp_path / "run"))
    (run / "manifest.json").write_bytes(MISSHAPEN_MANIFESTS[content])
    with pytest.warns(UserWarning, match="manifest.json is damaged"):
        result = run_study(study, run, loaded=tiny_base, show_progress_bar=False)
    assert result.complete and result.generated == 0
    assert len(json.loads((run / "manifest.json").read_text())["runs"]) == 1


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["manifest.json", "cells.csv", "scores.csv", "scores/embeddings-*.safetensors",
                                  "scores/scoring_cost.json", "images/baseline/*.png"])
def test_a_damaged_output_file_does_not_block_a_rerun(scored_run, tmp_path, tiny_base, name, damage):
    study, original = scored_run
    run = Path(shutil.copytree(original, tmp_path / "run"))
    path = sorted(run.glob(name))[0]
    path.write_bytes(DAMAGE[damage])
    scored = name.startswith("scores")  # unscored, the rerun merges the previous cells.csv's columns
    result = run_study(study, run, loaded=tiny_base, show_progress_bar=False, score=scored)
    assert result.complete and result.generated == (1 if name.endswith(".png") else 0)
    assert not scored or not result.scores["value"].isna().any()
    assert len(json.loads((run / "manifest.json").read_text())["runs"]) >= 1
    assert (run / "cells.csv").stat().st_size > 0 and path.stat().st_size > 0


def test_score_cli_on_a_damaged_manifest_is_one_line(tmp_path, capsys):
    from workbench.__main__ import main

    (tmp_path / "manifest.json").write_text("")
    assert main(["score", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "manifest.json" in error and "damaged" in error


def test_out_on_a_read_only_filesystem_is_one_line_naming_the_folder(tmp_path, monkeypatch, capsys):
    import os

    from workbench.__main__ import main

    parent = tmp_path / "readonly"
    parent.mkdir()
    out = parent / "run"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(parent)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    # Tests may run as root, where chmod 0o500 does not stop writes: simulate the read-only mount.
    monkeypatch.setattr(os, "mkdir", mkdir)
    code = main(["run", str(REPO / "presets/tiny.yaml"), "--out", str(out), "--no-score"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert str(out) in error and "Read-only file system" in error


# --- two writers --------------------------------------------------------------------------------


def _hold_run(study, run, tiny_base, release: threading.Event):
    """Start run_study in a thread that pauses after its first image until `release` is set."""
    started, outcome = threading.Event(), {}

    def progress(event):
        started.set()
        release.wait(30)

    def target():
        outcome["result"] = run_study(study, run, loaded=tiny_base, show_progress_bar=False, score=False,
                                      progress=progress)

    thread = threading.Thread(target=target)
    thread.start()
    assert started.wait(30)
    return thread, outcome


def test_a_second_run_into_a_busy_folder_says_so_and_does_no_work(tmp_path, tiny_base, monkeypatch):
    import os

    monkeypatch.setattr("workbench.files.LOCK_WAIT_SECONDS", 0.3)
    study, run, release = parse_study(tiny_study(seeds=[0, 1])), tmp_path / "run", threading.Event()
    thread, outcome = _hold_run(study, run, tiny_base, release)
    try:
        with pytest.raises(StudyError, match=rf"^{run} is in use by another run \(pid {os.getpid()}\)"):
            run_study(study, run, loaded=tiny_base, show_progress_bar=False, score=False)
    finally:
        release.set()
        thread.join(60)
    assert outcome["result"].complete and outcome["result"].generated == 2


def test_a_second_run_waits_for_the_first_and_then_generates_nothing(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setattr("workbench.files.LOCK_WAIT_SECONDS", 30)
    study, run, release = parse_study(tiny_study(seeds=[0, 1])), tmp_path / "run", threading.Event()
    thread, outcome = _hold_run(study, run, tiny_base, release)
    threading.Timer(0.5, release.set).start()
    start = time.monotonic()
    second = run_study(study, run, loaded=tiny_base, show_progress_bar=False, score=False)
    thread.join(60)
    assert time.monotonic() - start >= 0.4
    assert outcome["result"].generated == 2 and second.complete and second.generated == 0


def test_a_folder_held_by_another_process_names_that_process(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr("workbench.files.LOCK_WAIT_SECONDS", 0.3)
    run = tmp_path / "run"
    hold = ("import sys; from pathlib import Path; from workbench.files import run_folder_lock\n"
            f"with run_folder_lock(Path({str(run)!r})):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyError, match=rf"^{run} is in use by another run \(pid {holder.pid}\)"):
            run_study(parse_study(tiny_study(seeds=[0])), run, show_progress_bar=False, score=False)
    finally:
        holder.communicate("", timeout=30)
    assert not list(run.glob("images/*/*.png"))
