"""No client reads a file it did not produce: uploaded zips, references, run folders over HTTP, Stop, /run."""

import io
import json
import re
import shutil
import socket
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import yaml
from conftest import tiny_study
from PIL import Image

from workbench.app import AppConfig, Workbench, launch_options
from workbench.app.config import TINY_PRESET
from workbench.app.uploads import served_file
from workbench.app.views import column_detail
from workbench.errors import StudyError
from workbench.export import unzip_run, zip_run
from workbench.jobs import job_events, new_run_dir
from workbench.runner import RunResult, run_study
from workbench.spec import parse_study


def workbench(tmp_path: Path, public: bool = True) -> Workbench:
    """An app with its components built, whose handlers the tests call as a session would."""
    wb = Workbench(AppConfig(preset=TINY_PRESET, public=public, runs_dir=tmp_path / "runs"))
    wb.build()
    return wb


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def run_zip(path: Path, study: dict, cells: str | None = None, manifest_study: dict | None = None) -> Path:
    """A zip shaped like an export: study.yaml, manifest.json, a reference, optionally cells.csv."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("study.yaml", yaml.safe_dump(study))
        archive.writestr("manifest.json", json.dumps({"study": manifest_study or study}))
        archive.writestr("references/00_cat.png", png_bytes())
        if cells is not None:
            archive.writestr("cells.csv", cells)
    return path


def zipped_study(reference: str) -> dict:
    return tiny_study(subject={"reference_images": [reference], "token": "sks", "class_noun": "cat"})


def run_folders(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in runs_dir.iterdir() if p.name != "uploads")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_base):
    study = parse_study(tiny_study(methods=[{"kind": "baseline"}, {"kind": "lora", "path": "tiny", "weights": [1.0]}]))
    return run_study(study, tmp_path_factory.mktemp("scored"), loaded=tiny_base, show_progress_bar=False)


# ---------------------------------------------------------------- uploaded zips


def test_a_zip_whose_cells_csv_names_a_file_outside_its_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    cells = "column,image\nbaseline,references/00_cat.png\nbaseline,../../secret.txt\n"
    archive = run_zip(tmp_path / "evil.zip", zipped_study("references/00_cat.png"), cells)
    with pytest.raises(StudyError, match=r"evil\.zip: cells\.csv: image\[1\]: '\.\./\.\./secret\.txt' is outside"):
        unzip_run(archive, tmp_path / "runs" / "loaded")

    wb = workbench(tmp_path)
    with pytest.raises(gr.Error, match="outside"):
        wb.on_load_file(str(archive))
    assert run_folders(wb.config.runs_dir) == []  # and the refused upload left nothing behind


def test_a_zip_whose_study_names_a_reference_outside_its_folder_is_refused_in_any_mode(tmp_path):
    elsewhere = tmp_path / "other-run" / "references" / "x.png"  # another user's reference image
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(png_bytes())
    for public in (True, False):
        wb = workbench(tmp_path / str(public), public)
        for reference in (str(elsewhere), "../../other-run/references/x.png"):
            archive = run_zip(tmp_path / "ref.zip", zipped_study(reference))
            with pytest.raises(gr.Error, match=r"subject\.reference_images\[0\]: .* is outside"):
                wb.on_load_file(str(archive))
        # the manifest's study is read too (the grid's click map): the same rule
        archive = run_zip(tmp_path / "ref.zip", zipped_study("references/00_cat.png"),
                          manifest_study=zipped_study(str(elsewhere)))
        with pytest.raises(gr.Error, match=r"manifest\.json: subject\.reference_images\[0\]: .* is outside"):
            wb.on_load_file(str(archive))
        assert run_folders(wb.config.runs_dir) == []


def test_a_public_zip_whose_manifest_names_a_model_off_the_allow_list_is_refused(tmp_path):
    manifest = {**zipped_study("references/00_cat.png"), "lora": [{"path": "/srv/private/lora.safetensors"}]}
    archive = run_zip(tmp_path / "m.zip", zipped_study("references/00_cat.png"), manifest_study=manifest)
    wb = workbench(tmp_path)
    with pytest.raises(gr.Error, match=r"lora\[0\]\.path: '/srv/private/lora.safetensors' is not offered"):
        wb.on_load_file(str(archive))
    assert run_folders(wb.config.runs_dir) == []


def test_an_existing_file_and_a_missing_one_get_the_same_answer_in_public_mode(tmp_path):
    existing = tmp_path / "shadow"  # a server file that is not an image
    existing.write_text("root:*:19000:0:99999:7:::")
    wb = workbench(tmp_path)
    answers = []
    for reference in (str(existing), str(tmp_path / "missing.png")):
        with pytest.raises(gr.Error) as refused:
            wb.on_load_file(str(run_zip(tmp_path / "probe.zip", zipped_study(reference))))
        answers.append(str(refused.value).replace(reference, "PATH"))
    assert answers[0] == answers[1]
    for text in (f"base: tiny\nsubject: {{reference_images: ['{existing}']}}\n",
                 f"base: tiny\nsubject: {{reference_images: ['{tmp_path / 'missing.png'}']}}\n"):
        with pytest.raises(gr.Error, match="file paths are not accepted"):
            wb.on_yaml_to_form(text, [])


def test_an_exported_run_loads_back_in_the_public_app(scored_run, tmp_path):
    archive = zip_run(scored_run.run_dir, tmp_path / "20261123-133925-t-14d978.zip")
    wb = workbench(tmp_path)
    loaded = wb.on_load_file(str(archive))
    run_dir = Path(loaded[wb.run_state])
    assert run_dir.parent == wb.config.runs_dir
    assert "4/4 cells on disk" in loaded[wb.status]
    references = loaded[wb.refs_state]
    assert len(references) == 1 and Path(references[0]).is_relative_to(run_dir)
    # what the form shows runs again on the public app, from the run folder's own reference
    prepared = wb.on_yaml_run(loaded[wb.yaml_code], references, str(run_dir))
    assert prepared[wb.run_state] == str(run_dir)


def test_a_column_never_serves_an_image_outside_its_run_folder(scored_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "secret.txt").write_text("password")
    (run_dir / "images").mkdir()
    (run_dir / "images" / "a.png").write_bytes(png_bytes())
    (run_dir / "cells.csv").write_text("prompt_index,prompt,seed,column,image\n0,a,0,baseline,images/a.png\n"
                                       "0,a,1,baseline,../secret.txt\n0,a,2,baseline,/etc/hostname\n")
    items, _ = column_detail(run_dir, "baseline")
    assert [Path(path) for path, _ in items] == [run_dir / "images" / "a.png"]


# ---------------------------------------------------------------- run folders and HTTP


def test_run_folders_are_named_with_128_random_bits(tmp_path):
    names = [new_run_dir(tmp_path, "my study").name for _ in range(2)]
    tokens = [re.fullmatch(r"\d{8}-\d{6}-my-study-([0-9a-f]+)", name).group(1) for name in names]
    assert all(len(token) == 32 for token in tokens) and tokens[0] != tokens[1]


def test_run_files_are_served_only_as_the_copies_handed_to_their_session(scored_run, tmp_path):
    import httpx

    config = AppConfig(preset=TINY_PRESET, public=True, runs_dir=tmp_path / "runs")
    wb = Workbench(config)
    demo = wb.build()
    other = new_run_dir(config.runs_dir, "other") / "references" / "x.png"
    mine = config.runs_dir / "mine"
    shutil.copytree(scored_run.run_dir, mine)
    other.parent.mkdir(parents=True)
    other.write_bytes(png_bytes((1, 2, 3)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_options(config))
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/file="
        assert httpx.get(url + str(other)).status_code == 403  # known path, another session's folder
        copy = served_file(other)
        assert not Path(copy).is_relative_to(config.runs_dir)
        response = httpx.get(url + copy)
        assert response.status_code == 200 and response.content == other.read_bytes()
    finally:
        demo.close()

    # what the handlers give a session are such copies, never paths in a run folder
    gallery, _ = wb.on_column(str(mine), "lora@1")
    references = wb.set_references([str(other)])[wb.form.reference_gallery]
    exported = wb.on_export(str(mine))
    paths = [Path(path) for path, _ in gallery["value"] + references] + [Path(exported)]
    assert len(paths) == 4 and all(p.is_file() and not p.is_relative_to(config.runs_dir) for p in paths)


# ---------------------------------------------------------------- stop and /run


def drain(study, run_dir: str, job: str, on_first=None) -> RunResult:
    result = None
    for item in job_events(study, run_dir, score=False, tick=0.05, job=job):
        if isinstance(item, RunResult):
            result = item
        elif item is not None and on_first is not None:
            on_first()
            on_first = None
    return result


def test_stop_from_another_session_does_not_stop_the_job(tmp_path):
    wb = workbench(tmp_path, public=False)
    prepared = wb.prepare(tiny_study(seeds=[0, 1, 2], steps=3), None, set())
    study, run_dir, job = prepared[wb.study_state], prepared[wb.run_state], prepared[wb.job_state]

    def other_sessions_stop():  # one opened the same folder; its Stop carries its own job, or none
        wb.on_stop(run_dir, None)
        wb.on_stop(run_dir, wb.prepare(tiny_study(), run_dir, set())[wb.job_state])

    result = drain(study, run_dir, job, other_sessions_stop)
    assert result.complete and not result.stopped

    again = wb.prepare(tiny_study(seeds=[3, 4, 5, 6], steps=3), run_dir, set())
    result = drain(again[wb.study_state], run_dir, again[wb.job_state],
                   lambda: wb.on_stop(run_dir, again[wb.job_state]))
    assert result.stopped  # its own session's Stop still works


def test_a_refused_run_request_leaves_no_run_folder(tmp_path):
    wb = workbench(tmp_path)
    bad_image = tmp_path / "notes.png"
    bad_image.write_text("not pixels")
    refused = [
        (yaml.safe_dump(tiny_study(seeds=["x"])), None),
        (yaml.safe_dump(zipped_study("/etc/hostname")), None),
        (yaml.safe_dump(tiny_study(base="/etc/passwd.safetensors")), None),
        (yaml.safe_dump(tiny_study()), [str(bad_image)]),
    ]
    for text, references in refused:
        with pytest.raises(gr.Error):
            list(wb.api_run(text, references))
    assert run_folders(wb.config.runs_dir) == []


def test_a_run_request_that_fails_before_its_first_cell_leaves_no_run_folder(tmp_path):
    broken = tmp_path / "broken-dreambooth"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    wb = workbench(tmp_path, public=False)
    study = tiny_study(methods=[{"kind": "dreambooth", "checkpoint": str(broken)}])
    with pytest.raises(gr.Error, match="dreambooth.checkpoint: cannot load"):
        list(wb.api_run(yaml.safe_dump(study)))
    assert run_folders(wb.config.runs_dir) == []


def test_an_exported_run_is_rescored_by_the_cli_from_its_unzipped_folder(scored_run, tmp_path):
    from workbench.__main__ import main

    loaded = unzip_run(zip_run(scored_run.run_dir, tmp_path / "run.zip"), tmp_path / "loaded")
    manifest = json.loads((loaded / "manifest.json").read_text())
    assert manifest["study"]["subject"]["reference_images"] == ["references/00_chelsea.png"]  # no server path
    assert main(["score", str(loaded)]) == 0


def _bad_crc(path: Path, study: dict) -> Path:
    run_zip(path, study)
    data = bytearray(path.read_bytes())
    start = data.index(png_bytes()[:8])  # the stored reference's bytes: flip one, its CRC no longer matches
    data[start + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


MALFORMED = {
    "cells.csv without a method column": lambda p, s: run_zip(p, s, "image,weight\nreferences/00_cat.png,1\n"),
    "a weight that is not a number": lambda p, s: run_zip(
        p, s, "prompt_index,prompt,method,kind,weight,seed,column,image\n0,a,baseline,baseline,abc,0,baseline,"
              "references/00_cat.png\n"),
    "grid.png that is not a PNG": lambda p, s: _with_member(run_zip(p, s), "grid.png", b"not a png"),
    "a member with a bad CRC": _bad_crc,
}


def _with_member(path: Path, name: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(name, data)
    return path


@pytest.mark.parametrize("malformed", MALFORMED)
def test_a_zip_with_malformed_run_files_is_refused_in_one_line_and_leaves_nothing(tmp_path, malformed):
    archive = MALFORMED[malformed](tmp_path / "odd.zip", zipped_study("references/00_cat.png"))
    wb = workbench(tmp_path)
    with pytest.raises(gr.Error) as refused:
        wb.on_load_file(str(archive))
    message = refused.value.message
    assert message.startswith("odd.zip: ") and "\n" not in message
    assert str(wb.config.runs_dir) not in message  # no server path in what the client reads
    assert run_folders(wb.config.runs_dir) == []


def test_a_zip_whose_scores_csv_is_not_csv_loads_without_scores(tmp_path):
    archive = _with_member(run_zip(tmp_path / "odd.zip", zipped_study("references/00_cat.png")), "scores.csv",
                           b"a,b\n1\n\x00\x01,2,3,4\n")
    wb = workbench(tmp_path)
    updates = wb.on_load_file(str(archive))
    assert updates[wb.plot] is None and len(run_folders(wb.config.runs_dir)) == 1  # no scores, no frontier


def test_a_zip_whose_table_unzips_past_the_cap_is_refused_before_it_is_written(tmp_path):
    from workbench.export import MAX_TABLE_BYTES

    archive = run_zip(tmp_path / "bomb.zip", zipped_study("references/00_cat.png"))
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("cells.csv", "image\n" + "references/00_cat.png\n" * (MAX_TABLE_BYTES // 20))
    assert archive.stat().st_size < MAX_TABLE_BYTES // 50
    with pytest.raises(StudyError, match=r"bomb\.zip: cells\.csv unzips to \d+ MB"):
        unzip_run(archive, tmp_path / "runs" / "loaded")
    assert not (tmp_path / "runs" / "loaded").exists()


def test_run_folders_that_never_got_a_cell_are_swept_once_they_are_old(tmp_path):
    import os
    import time

    from workbench.jobs import sweep_unused_run_folders

    runs = tmp_path / "runs"
    old_empty, young_empty, old_with_image = (new_run_dir(runs, name) for name in ("old", "young", "kept"))
    (old_empty / "references").mkdir()
    (old_empty / "references" / "a.png").write_bytes(png_bytes())
    (old_with_image / "images" / "baseline").mkdir(parents=True)
    (old_with_image / "images" / "baseline" / "p00_w0_s0_0123456789abcdef.png").write_bytes(png_bytes())
    uploads = runs / "uploads" / "a-session"  # the sessions' uploads live beside the run folders
    uploads.mkdir(parents=True)
    (uploads / "ref.png").write_bytes(png_bytes())
    long_ago = time.time() - 3 * 3600
    for folder in (old_empty, old_with_image, runs / "uploads"):
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (long_ago, long_ago))
    sweep_unused_run_folders(runs, older_than_s=3600)
    assert sorted(p.name for p in runs.iterdir()) == sorted([young_empty.name, old_with_image.name, "uploads"])
    assert (uploads / "ref.png").is_file()


def test_preparing_a_study_sweeps_old_run_folders_that_never_got_a_cell(tmp_path):
    import os
    import time

    wb = workbench(tmp_path)
    abandoned = new_run_dir(wb.config.runs_dir, "abandoned")
    long_ago = time.time() - 24 * 3600
    os.utime(abandoned, (long_ago, long_ago))
    wb.prepare(zipped_study("assets/chelsea.png") | {"subject": {"reference_images": [str(Path("assets/chelsea.png").resolve())], "class_noun": "cat"}},
               None, {str(Path("assets/chelsea.png").resolve())})
    assert abandoned.name not in run_folders(wb.config.runs_dir)


def test_a_zip_whose_cells_csv_escapes_a_path_outside_is_refused(tmp_path):
    # `'` is how the run's CSV writer escapes text; every reader takes it off, so the check must too
    cells = "column,image\nbaseline,'../../secret.txt\n"
    archive = run_zip(tmp_path / "escaped.zip", zipped_study("references/00_cat.png"), cells)
    with pytest.raises(StudyError, match=r"escaped\.zip: cells\.csv: image\[0\]: '\.\./\.\./secret\.txt' is outside"):
        unzip_run(archive, tmp_path / "runs" / "loaded")
