"""The Workbench: the page's layout and the handlers wired to it. Jobs, run folders and scoring live in the library.

The form becomes a study dict (the YAML schema of presets/), parsed once per Generate into a
Study that the session keeps (gr.State) for the job and its views. Every generate event shares one
queue (`concurrency_id="gpu"`, limit 1): one pipeline serves every user, and each job attaches its
own adapters and scales.
"""

from __future__ import annotations

import functools
import inspect
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import gradio as gr

from ..errors import StudyError
from ..export import saved_study, unzip_run, zip_refusal, zip_run
from ..jobs import JobStream, clear_stop, job_events, new_run_dir, on_gpu, request_stop, stop_requested, \
    sweep_unused_run_folders, why_unscored, with_references
from ..paths import inside
from ..plugins import load_plugins
from ..report import grid_images
from ..run_folder import RunFolder, saved_runs
from ..runner import RunResult
from ..safe_yaml import MAX_MANIFEST_BYTES, MAX_STUDY_BYTES, load_yaml, read_study_file
from ..spec import Study, parse_study
from .config import ASSETS, DEFAULT_PRESET, MAX_REFERENCES, PRESETS, REPO, TINY_PRESET, AppConfig, check_public, \
    device_banner, discover_models, preset_data
from .layout import Layout, study_yaml
from .uploads import normalize_reference, served_file, session_folder
from .views import Views, column_detail, column_for_click, column_seeds, disk_views, failure_text, \
    grid_click_column, live_views, progress_html, progress_text

# Events that read files or validate (and may raise gr.Error, which only a queued event shows as a
# toast): queued, but on their own group so they never wait behind a GPU job.
QUICK = dict(queue=True, concurrency_id="io", concurrency_limit=8, show_progress="hidden")
API_REDRAW_SECONDS = 1.0  # /run streams its grid at most this often


def user_errors(fn):
    """StudyError (a study or upload the user can fix) -> gr.Error with its one-line message."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StudyError as error:
                raise gr.Error(str(error)) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudyError as error:
            raise gr.Error(str(error)) from None
    return plain


class Workbench(Layout):
    """One app: its config, its components (Layout) and the handlers wired to them.

    Per-session data lives in gr.State (reference images, the prepared Study, the run folder, the
    job token); this object holds only configuration and component handles, shared by every session.
    """

    def __init__(self, config: AppConfig):
        self.config = config
        load_plugins(config.plugins)  # before the form, the model choices and the tables read the registries
        config.runs_dir.mkdir(parents=True, exist_ok=True)
        self.choices = discover_models(config.models_dir)
        self.preset_path = (Path(config.preset) if config.preset else DEFAULT_PRESET).resolve()
        self.initial, self.initial_refs = preset_data(self.preset_path)
        self.demo_assets = {str(p.resolve()) for p in ASSETS.glob("*.png")}
        self.gpu_job = on_gpu(job_events)

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Personalization workbench", analytics_enabled=False) as demo:
            self.layout()
            self.wire(demo)
        demo.queue(max_size=self.config.queue_size, default_concurrency_limit=1)
        return demo

    def wire(self, demo: gr.Blocks) -> None:
        form = self.form
        private = dict(api_visibility="private")
        quick = {**QUICK, **private}
        instant = dict(queue=False, **private)
        form_inputs = form.components()
        self.panels = {self.status, self.grid, self.table, self.plot, self.suggestion, self.column_pick, self.x_axis}
        self.load_outputs = form_inputs | self.panels | {
            form.notes, self.refs_state, form.reference_gallery, form.demo_subject, self.run_state, self.yaml_code,
            self.banner}

        # subject
        form.uploads.upload(self.on_upload, form.uploads, self.reference_outputs, **quick)
        form.demo_subject.input(self.on_demo_subject, form.demo_subject, self.reference_outputs, **instant)
        form.prompt_list.input(self.on_prompt_list, form.prompt_list, form.prompts, **quick)

        # presets, files, runs
        self.preset_button.click(self.on_preset, self.preset_pick, self.load_outputs, **quick)
        self.tiny_button.click(lambda: self.on_preset(str(TINY_PRESET)), None, self.load_outputs, **quick)
        self.load_file.upload(self.on_load_file, self.load_file, self.load_outputs, **quick)
        if self.run_pick is not None:
            self.run_button.click(self.on_open_run, self.run_pick, self.load_outputs, **quick)
            self.run_pick.focus(lambda: gr.update(choices=saved_runs(self.config.runs_dir)), None, self.run_pick,
                                **instant)
        self.yaml_form_button.click(self.on_yaml_to_form, [self.yaml_code, self.refs_state],
                                    self.load_outputs - self.panels - {self.run_state}, **quick)
        demo.load(lambda: self.filled(self.initial, self.initial_refs, message="Set up a study and press Generate."),
                  None, self.load_outputs, **instant)

        # generate (validate at once, then wait for the GPU queue), stop, start over
        prepared = {self.study_state, self.run_state, self.job_state, self.yaml_code, self.status}
        job = dict(fn=self.run_job, inputs=[self.study_state, self.run_state, self.job_state, self.x_axis,
                                            self.column_pick],
                   outputs=[*self.panels, self.generate_button], concurrency_id="gpu", concurrency_limit=1,
                   show_progress="hidden", **private)
        self.generate_button.click(self.on_generate, form_inputs | {self.refs_state, self.run_state, self.job_state},
                                   prepared, **quick).success(**job)
        self.yaml_run_button.click(self.on_yaml_run, [self.yaml_code, self.refs_state, self.run_state,
                                                      self.job_state], prepared, **quick).success(**job)
        self.stop_button.click(self.on_stop, [self.run_state, self.job_state], None, **instant)
        self.new_button.click(self.on_new_run, None, self.panels | {self.run_state, self.column_gallery,
                                                                    self.column_info, self.export_file}, **instant)

        # explore
        self.x_axis.input(self.on_axis, [self.run_state, self.x_axis], {self.plot, self.table, self.suggestion},
                          **instant)
        self.column_pick.change(self.on_column, [self.run_state, self.column_pick],
                                [self.column_gallery, self.column_info], **instant)
        self.table.select(self.on_table_select, None, self.column_pick, **instant)
        self.grid.select(self.on_grid_select, [self.study_state, self.run_state], self.column_pick, **instant)
        self.plot_click.click(self.on_plot_click, [self.run_state, self.plot_text], self.column_pick, **instant,
                              js="(run_dir, text) => [run_dir, window.workbenchClick || '']")
        self.export_button.click(self.on_export, self.run_state, self.export_file, **quick)

        self.api_button.click(self.api_run, [self.api_yaml, self.api_refs], [self.api_grids, self.api_table,
                                                                            self.api_plot], api_name="run",
                              api_description="Run a study given as YAML text (the schema of presets/; optional "
                              "reference images replace subject.reference_images). Returns the grid image(s), the "
                              "summary table (one row per method@weight: mean, std, n of each metric, "
                              "on_pareto_front) and the Plotly frontier.",
                              concurrency_id="gpu", concurrency_limit=1)

    # ------------------------------------------------------------ subject

    @property
    def reference_outputs(self) -> set:
        return {self.refs_state, self.form.reference_gallery, self.form.demo_subject}

    def set_references(self, paths: list[str]) -> dict:
        demo = paths[0] if len(paths) == 1 and paths[0] in self.demo_assets else ""
        return {self.refs_state: paths, self.form.reference_gallery: [(served_file(p), None) for p in paths],
                self.form.demo_subject: demo}

    @user_errors
    def on_upload(self, files: list[str] | None, request: gr.Request) -> dict:
        files = files or []
        if len(files) > MAX_REFERENCES:
            raise StudyError(f"reference images: {len(files)} uploaded; use at most {MAX_REFERENCES}")
        folder = session_folder(self.config.runs_dir / "uploads", request.session_hash)
        return self.set_references([str(normalize_reference(f, folder, f"reference image {Path(f).name}"))
                                    for f in files])

    @user_errors
    def on_demo_subject(self, path: str) -> dict:
        return self.set_references([str(inside(ASSETS, path, "demo subject"))]) if path else {}

    @user_errors
    def on_prompt_list(self, path: str):
        if not path:
            return gr.update()
        data, _ = preset_data(inside(PRESETS, path, "prompts preset"))
        return "\n".join(data.get("prompts") or [])

    # ------------------------------------------------------------ presets, files, runs

    def filled(self, data: dict, references: list[str], run_dir: Path | None = None, message: str = "") -> dict:
        """Every load output for a study (and the run folder it continues, if any)."""
        views = disk_views(run_dir, "dino") if run_dir else Views()
        return {
            **self.form.fill(data), **self.set_references(references), self.yaml_code: study_yaml(data),
            self.banner: gr.update(visible=bool(device_banner(str(data.get("base", ""))))),
            self.run_state: str(run_dir) if run_dir else None, **self.render(views, progress_html(
                0, 0, message or "Loaded. Press Generate.")),
            self.column_pick: gr.update(choices=views.columns, value=None),
        }

    def checked(self, data: dict, trusted: set[str] = frozenset(), base_dir: Path = REPO) -> dict:
        return check_public(data, self.choices, trusted, base_dir) if self.config.public else data

    @user_errors
    def on_preset(self, path: str) -> dict:
        if not path:
            raise StudyError("preset: pick one first")
        data, references = preset_data(inside(PRESETS, path, "preset"))
        return self.filled(data, references, message=f"Loaded preset {Path(path).stem}. Press Generate.")

    def open_run(self, run_dir: Path, what: str) -> dict:
        """A run folder's study in the form, its views in the panels; its references must be files inside it."""
        run = RunFolder(run_dir)
        data = run.references_inside(saved_study(run_dir), what)
        trusted = set(data["subject"]["reference_images"])
        study = parse_study(self.checked(data, trusted, run_dir), source=what, base_dir=run_dir)
        if self.config.public and (run_dir / "manifest.json").is_file():  # its study draws the grid's click map
            saved = run.references_inside(run.stored_studies()["manifest.json"], f"{what}: manifest.json")
            self.checked(saved, set(saved["subject"]["reference_images"]), run_dir)
        cells = run.cells()
        on_disk, total = 0 if cells is None else len(cells), len(study.cells())
        return self.filled(data, list(study.subject.reference_images), run_dir,
                           f"Loaded run {run_dir.name}: {on_disk}/{total} cells on disk. Press Generate to "
                           "continue (only missing cells are generated).")

    @user_errors
    def on_load_file(self, path: str | None) -> dict:
        if not path:
            return {}
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".zip":
            # "20261123-133925-tiny-14d978.zip" (a run exported here) -> a folder "<now>-tiny-<new id>"
            run_dir = new_run_dir(self.config.runs_dir, re.sub(r"^\d{8}-\d{6}-(.*)-[0-9a-f]{6,32}$", r"\1", path.stem))
            try:
                return self.open_run(unzip_run(path, run_dir), path.name)
            except Exception as error:  # hostile input: any failure refuses the upload, keeps nothing, names no path
                shutil.rmtree(run_dir, ignore_errors=True)
                raise StudyError(zip_refusal(path.name, run_dir, error)) from None
        # a manifest.json grows a little with every rerun; its study is capped like any other
        data = read_study_file(path, path.name, max_bytes=MAX_MANIFEST_BYTES if suffix == ".json" else MAX_STUDY_BYTES)
        if suffix == ".json":
            if not isinstance(data, dict) or "study" not in data:
                raise StudyError(f"{path.name}: not a manifest.json (no 'study' key)")
            data = data["study"]
        study = parse_study(self.checked(mapping(data, path.name)), source=path.name, base_dir=REPO)
        return self.filled(data, list(study.subject.reference_images), message=f"Loaded {path.name}. Press Generate.")

    @user_errors
    def on_open_run(self, path: str | None) -> dict:
        if not path:
            raise StudyError("run folder: pick one first")
        run_dir = inside(self.config.runs_dir, path, "run folder")
        return self.open_run(run_dir, run_dir.name)

    @user_errors
    def on_yaml_to_form(self, text: str, references: list[str]) -> dict:
        data = self.checked(mapping(read_yaml(text), "Study YAML"), set(references or []))
        study = parse_study(data, source="Study YAML", base_dir=REPO)
        updates = self.filled(data, list(study.subject.reference_images) or list(references or []))
        # same session, same run folder: cells already made stay cached
        return {key: value for key, value in updates.items() if key not in self.panels | {self.run_state}}

    # ------------------------------------------------------------ generate, stop

    def prepare(self, data: dict, run_dir: str | None, trusted: set[str], job: str | None = None) -> dict:
        """Validate (before any GPU work), pick the run folder, copy the references into it.

        The study is parsed here, once: the job and its views get this Study. A new run folder is
        made only for a valid study. `job` is the session's job token (a new one when it has none
        yet): its Stop reaches only the jobs it started.
        """
        data = self.checked(data, trusted)
        study = parse_study(data, source="study", base_dir=REPO)
        fresh = not (run_dir and Path(run_dir).is_dir())
        if fresh:  # folders of jobs that never made a cell (client gone while queued, failed early) go
            sweep_unused_run_folders(self.config.runs_dir)
        run_dir = new_run_dir(self.config.runs_dir, study.name) if fresh else Path(run_dir)
        job = job or secrets.token_hex(16)
        clear_stop(run_dir, job)
        try:
            refs = [str(normalize_reference(p, run_dir / "references", f"subject.reference_images[{i}]"))
                    for i, p in enumerate(study.subject.reference_images)]
        except StudyError:
            if fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        data = {**data, "subject": {**(data.get("subject") or {}), "reference_images": refs}}
        total = len(study.cells())
        return {self.study_state: with_references(study, refs), self.run_state: str(run_dir), self.job_state: job,
                self.yaml_code: study_yaml(data),
                self.status: progress_html(0, total, f"Queued: {total} cells into {run_dir.name}/ …")}

    @user_errors
    def on_generate(self, v: dict) -> dict:
        references = v[self.refs_state] or []
        if not references:
            raise StudyError("reference images: upload 1–5 images of the subject or pick a demo subject")
        return self.prepare(self.form.read(v, references), v[self.run_state], set(references), v[self.job_state])

    @user_errors
    def on_yaml_run(self, text: str, references: list[str], run_dir: str | None, job: str | None = None) -> dict:
        data = mapping(read_yaml(text), "Study YAML")
        trusted = set(references or [])
        if run_dir:  # the YAML shown after a Generate names the copies in the run folder
            trusted |= {str(p) for p in (Path(run_dir) / "references").glob("*.png")}
        subject = data.get("subject") if isinstance(data.get("subject"), dict) else {}
        if not subject.get("reference_images"):
            data["subject"] = {**subject, "reference_images": list(references or [])}
        return self.prepare(data, run_dir, trusted, job)

    def on_stop(self, run_dir: str | None, job: str | None) -> None:
        """Stop this session's job; a session that opened another's run folder has another job token."""
        if job and request_stop(run_dir, job):
            gr.Info("Stopping within one denoising step; finished images are kept.")

    def on_new_run(self) -> dict:
        return {**self.render(Views(), progress_html(0, 0, "New run: the next Generate starts a fresh run folder.")),
                self.column_pick: gr.update(choices=[], value=None), self.run_state: None, self.column_gallery: [],
                self.column_info: "", self.export_file: None}

    def render(self, views: Views, status_html: str) -> dict:
        updates = {self.status: status_html, self.grid: views.grid, self.plot: views.figure,
                   self.suggestion: views.suggestion, self.column_pick: gr.update(choices=views.columns),
                   self.table: gr.update(value=views.table, column_widths=views.widths)}
        if views.axes:  # the run's image metrics; before its first scores the menu stays as it is
            updates[self.x_axis] = gr.update(choices=views.axes)
        return updates

    def stream(self, study: Study, run_dir: Path, job: str, score: bool, every: float) -> JobStream:
        """The one loop over a GPU job, for the Generate button and /run alike."""
        return JobStream(self.gpu_job(study, str(run_dir), score, job=job), every)

    @user_errors
    def run_job(self, study: Study | None, run_dir: str | None, job: str | None, x: str,
                picked: str | None) -> Iterator[dict]:
        """The GPU job: stream the grid, scores and frontier as cells finish; keep everything on failure."""
        if study is None or not run_dir:
            raise StudyError("press Generate to prepare a study first")
        run_dir, job = Path(run_dir), job or ""
        total = len(study.cells())
        unscored = why_unscored(study)
        if unscored:  # the CLI's way out means nothing here: the run goes on, unscored
            gr.Warning(f"Scores are off for this run: {unscored.replace(', or pass --no-score', '')}")
        yield {**self.render(live_views(RunResult(study, run_dir, []), x, False),
                             progress_html(0, total, "Loading the base model …")),
               self.generate_button: gr.update(interactive=False)}
        start = time.perf_counter()
        stream = self.stream(study, run_dir, job, unscored is None, self.config.redraw_seconds)
        try:
            for event in stream:
                text = progress_text(event, time.perf_counter() - start, stop_requested(run_dir, job))
                yield self.render(live_views(event.run, x, unscored is None), progress_html(event.done, event.total, text))
        except Exception as error:
            message = (str(error) if isinstance(error, StudyError) else f"{type(error).__name__}: {error}").rstrip(".")
            text = failure_text(stream.done, total, message)
            yield {**self.render(disk_views(run_dir, x), progress_html(stream.done, total, text, "failed")),
                   self.generate_button: gr.update(interactive=True)}
            raise gr.Error(text) from None  # the status line may be scrolled off a phone's screen
        result = stream.result
        clear_stop(run_dir, job)
        cached = len(result.results) - result.generated
        if result.stopped:
            text, state = (f"Stopped: {len(result.results)}/{total} cells on disk ({result.generated} new, {cached} "
                           "cached). Press Generate to continue with the missing ones."), "stopped"
        else:
            text, state = (f"Done: {total} cells ({result.generated} generated, {cached} cached) in "
                           f"{time.perf_counter() - start:.1f} s → {run_dir.name}/"), "done"
        if result.truncated_prompts:
            from ..prompts import truncation_note

            text += " " + truncation_note(result.truncated_prompts)
        views = disk_views(run_dir, x)
        pick = picked if picked in views.columns else views.suggested or next(iter(views.columns), None)
        yield {**self.render(views, progress_html(len(result.results), total, text, state)),
               self.column_pick: gr.update(choices=views.columns, value=pick),
               self.generate_button: gr.update(interactive=True)}

    # ------------------------------------------------------------ explore, export

    def on_axis(self, run_dir: str | None, x: str) -> dict:
        if not run_dir:
            return {}
        views = disk_views(Path(run_dir), x)
        return {self.plot: views.figure, self.table: views.table, self.suggestion: views.suggestion}

    def on_column(self, run_dir: str | None, column: str | None):
        if not (run_dir and column):
            return [], ""
        items, info = column_detail(Path(run_dir), column)
        # 2 to 4 across: one image alone would fill the whole panel
        columns = min(4, max(2, column_seeds(Path(run_dir), column)))
        return gr.update(value=[(served_file(path), caption) for path, caption in items], columns=columns), info

    def on_table_select(self, event: gr.SelectData):
        row = event.row_value or []
        return gr.update(value=row[0]) if row else gr.update()

    def on_grid_select(self, study: Study | None, run_dir: str | None, event: gr.SelectData):
        column = grid_click_column(Path(run_dir), study, event.index[0]) if run_dir and event.index else None
        return gr.update(value=column) if column else gr.update()

    def on_plot_click(self, run_dir: str | None, text: str):
        column = column_for_click(Path(run_dir), text) if run_dir else None
        return gr.update(value=column) if column else gr.update()

    @user_errors
    def on_export(self, run_dir: str | None) -> str:
        if not run_dir:
            raise StudyError("export: generate something first")
        return served_file(zip_run(run_dir))

    # ------------------------------------------------------------ /run

    @user_errors
    def api_run(self, study_yaml: str, reference_images: list[str] | None = None):
        """Run a study given as YAML text (the schema of presets/); stream its grid, then grids, summary, frontier.

        `reference_images` (optional files) replace subject.reference_images. The summary has one row
        per method@weight with the mean, std and n of each metric and `on_pareto_front`.
        """
        data = mapping(read_yaml(study_yaml, "study_yaml"), "study_yaml")
        with tempfile.TemporaryDirectory() as uploads:  # the run folder is made once the study is valid
            trusted = set()
            if reference_images:
                if len(reference_images) > MAX_REFERENCES:
                    raise StudyError(f"reference_images: at most {MAX_REFERENCES}")
                trusted = {str(normalize_reference(p, Path(uploads), f"reference_images[{i}]"))
                           for i, p in enumerate(reference_images)}
                subject = data.get("subject") if isinstance(data.get("subject"), dict) else {}
                data["subject"] = {**subject, "reference_images": sorted(trusted)}
            prepared = self.prepare(data, None, trusted)
        run_dir = Path(prepared[self.run_state])
        stream = self.stream(prepared[self.study_state], run_dir, prepared[self.job_state], True, API_REDRAW_SECONDS)
        try:
            for event in stream:
                yield [(grid_images(event.run)[0][1], "grid.png")], None, None
        finally:
            if not any((run_dir / "images").glob("*/*.png")):  # nothing made: leave no empty run folder
                shutil.rmtree(run_dir, ignore_errors=True)
        if stream.result is None or not stream.result.results:
            raise StudyError("the study produced no images")
        # numbers, not display strings: this is for scripts
        yield ([(image, name) for name, image in grid_images(stream.result)], RunFolder(run_dir).summary(),
               disk_views(run_dir, "dino").figure)


def read_yaml(text: str | None, where: str = "Study YAML"):
    """A YAML text from a client, through the safe loader; None when it is blank."""
    return load_yaml(text, where) if text and text.strip() else None


def mapping(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise StudyError(f"{where}: expected a mapping of study fields (see presets/)")
    return data
