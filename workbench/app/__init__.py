"""The Gradio workbench: layout and event wiring over the library. No generation or scoring here.

    config.py     how the app is served, which models it offers, what a public app refuses
    form.py       the study form: components <-> study dict
    uploads.py    reference images in, served copies out
    views.py      the grid, score table, frontier and one column's images, for a live job or a run folder
    layout.py     where each component sits; page.css, page_head.css and page.js
    workbench.py  the Workbench: handlers wired to the layout

Jobs (a study in a worker thread, stop, ZeroGPU sizing) are `workbench.jobs`; run folders are read
through `workbench.run_folder.RunFolder`.
"""

from __future__ import annotations

import gradio as gr

from .config import AppConfig, default_config
from .layout import launch_options
from .workbench import Workbench


def build_app(config: AppConfig = AppConfig()) -> gr.Blocks:
    """The workbench Blocks app, queued (one GPU queue); launch it with `launch_options(config)`."""
    return Workbench(config).build()


__all__ = ["AppConfig", "Workbench", "build_app", "default_config", "launch_options"]
