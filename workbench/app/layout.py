"""The page: where each component sits, and the CSS and script it loads (page.css, page_head.css, page.js)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import yaml

from .config import ASSETS, PRESETS, AppConfig, device_banner
from .form import Form
from .views import Views, progress_html, x_axis_choices

HERE = Path(__file__).resolve().parent


def page_css() -> str:
    """The app's styles; Gradio scopes them inside the app's container."""
    return (HERE / "page.css").read_text()


def page_head() -> str:
    """What goes in the page's <head>: unscoped styles, and the script that turns a click on the frontier into
    a click on the hidden #plot-click button."""
    return (f"<style>\n{(HERE / 'page_head.css').read_text()}</style>\n"
            f"<script>\n{(HERE / 'page.js').read_text()}</script>\n")


def launch_options(config: AppConfig) -> dict:
    """Keyword arguments for `demo.launch(...)` that belong to the app (theme, CSS, files it may serve).

    Run folders are not served by path: handlers hand out copies (`served_file`).
    """
    return dict(css=page_css(), head=page_head(), theme=gr.themes.Soft(), allowed_paths=[str(ASSETS)],
                max_file_size=config.upload_limit, footer_links=["api", "gradio"])


def study_yaml(data: dict) -> str:
    """A study dict as the YAML the app shows (the schema of presets/)."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


class Layout:
    """The components of the page, made inside a gr.Blocks by `layout()`; Workbench wires them."""

    config: AppConfig
    choices: object
    preset_path: Path
    initial: dict
    initial_refs: list[str]

    def layout(self) -> None:
        config = self.config
        self.refs_state = gr.State(self.initial_refs)  # reference image paths of this session
        self.study_state = gr.State(None)  # the parsed Study of the job being prepared / run
        self.run_state = gr.State(None)  # this session's run folder (reused: cached cells come back at once)
        self.job_state = gr.State(None)  # this session's job token: its Stop reaches only the jobs it started

        gr.Markdown("# Personalization workbench\nCompare personalization methods side by side: a grid of "
                    "method × weight × seed × prompt, scored live (CLIP-I, CLIP-T, DINO) on a fidelity frontier.")
        banner_text = device_banner(str(self.initial.get("base", "")))
        with gr.Row(visible=bool(banner_text), elem_classes="wb-banner") as self.banner:
            gr.Markdown(banner_text, elem_id="banner-text")
            self.tiny_button = gr.Button("Load the tiny preset", size="sm", scale=0, min_width=160)

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                self.loaders()
                self.form = Form(self.choices, config.public)
            with gr.Column(scale=3, min_width=340):
                self.results()

        with gr.Row(visible=False):  # the scripted entry point /run, and the clicked point's text
            self.api_yaml = gr.Textbox(label="study_yaml")
            self.api_refs = gr.File(label="reference_images", file_count="multiple")
            self.api_grids = gr.Gallery(label="grids", format="png")
            self.api_table = gr.Dataframe(label="summary")
            self.api_plot = gr.Plot(label="frontier")
            self.api_button = gr.Button("run")
            self.plot_text = gr.Textbox(label="clicked point")

    def loaders(self) -> None:
        from ..run_folder import saved_runs

        with gr.Accordion("Load a preset or a saved run", open=False):
            presets = sorted(PRESETS.glob("*.yaml"))
            with gr.Row(equal_height=True):
                self.preset_pick = gr.Dropdown(
                    [(p.stem, str(p)) for p in presets], label="Preset", scale=3, min_width=160,
                    value=str(self.preset_path) if self.preset_path in presets else None)
                self.preset_button = gr.Button("Load preset", scale=1, min_width=100)
            self.load_file = gr.File(label="…or a study .yaml, a manifest.json, or an exported run .zip",
                                     file_types=[".yaml", ".yml", ".json", ".zip"], height=90)
            self.run_pick = self.run_button = None
            if not self.config.public:  # no browsing of the server's folders on a public app
                with gr.Row(equal_height=True):
                    self.run_pick = gr.Dropdown(saved_runs(self.config.runs_dir), scale=3, min_width=160,
                                                label=f"…or a run folder in {self.config.runs_dir.name}/")
                    self.run_button = gr.Button("Open run", scale=1, min_width=100)

    def results(self) -> None:
        with gr.Row():
            self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate", scale=2,
                                             min_width=110, size="md")
            self.stop_button = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=70, size="md")
            self.new_button = gr.Button("New run", elem_id="new-run", scale=1, min_width=90, size="md")
        self.status = gr.HTML(progress_html(0, 0, "Set up a study and press Generate."), elem_id="status")
        self.grid = gr.Image(label="Grid (columns method@weight, rows seeds by prompt)", show_label=False,
                             type="pil", format="png", interactive=False, elem_id="grid-image",
                             buttons=["download", "fullscreen"])
        axes = x_axis_choices()
        self.x_axis = gr.Radio(axes, value=axes[0][1] if axes else None, label="Image-fidelity axis",
                               elem_id="x-axis")
        gr.Markdown("**Fidelity frontier** · click a point to inspect its images", elem_id="frontier-title")
        self.plot = gr.Plot(label="Fidelity frontier", show_label=False, elem_id="frontier")
        gr.Markdown("Means ± std over prompts and seeds, labelled with their weight; the baseline is the "
                    "star; the dashed line is the Pareto front. Up and right is better.",
                    elem_id="frontier-note")
        self.suggestion = gr.Markdown("", elem_id="suggestion")
        empty = Views()
        self.table = gr.Dataframe(
            empty.table, label="Scores per method@weight (mean ± std over prompts and seeds; click a row "
            "to inspect it)", interactive=False, elem_id="score-table", max_height=420,
            column_widths=empty.widths)
        with gr.Accordion("Inspect one method@weight", open=True):
            self.column_pick = gr.Dropdown([], label="Column", elem_id="column-pick")
            self.column_info = gr.Markdown("")
            self.column_gallery = gr.Gallery(label="Images", show_label=False, columns=2, height="auto",
                                             object_fit="contain", fit_columns=False, elem_id="column-gallery")
        # clicked by page.js when a frontier point is clicked; hidden by page.css
        self.plot_click = gr.Button("inspect the clicked point", elem_id="plot-click", size="sm")
        with gr.Accordion("Export", open=False):
            self.export_button = gr.Button("Export the run as .zip")
            self.export_file = gr.File(label="Run zip: grids, images with metadata, cells.csv, summary.csv, "
                                       "frontier.html, manifest.json", interactive=False)
        with gr.Accordion("Study YAML", open=False):
            gr.Markdown("The same schema as `presets/*.yaml` and the `/run` API.", elem_classes="wb-hint")
            self.yaml_code = gr.Code(study_yaml(self.initial), language="yaml", lines=14, max_lines=40, interactive=True)
            with gr.Row():
                self.yaml_run_button = gr.Button("Run this YAML", variant="primary")
                self.yaml_form_button = gr.Button("Put it in the form")

