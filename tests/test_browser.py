"""The app in headless Chromium: upload a subject, run a 2 method x 2 weight x 2 seed study, explore it.

Needs Debian's `chromium` at /usr/bin/chromium and the `playwright` Python package (never
`playwright install`); skips cleanly without them. Set WORKBENCH_SCREENSHOTS=DIR to keep the
desktop (1280x800) and phone (390x844) screenshots.
"""

import os
import socket
import time
from pathlib import Path

import pytest
from conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install playwright)")
    from workbench.app import AppConfig, build_app, launch_options
    from workbench.app.config import TINY_PRESET

    config = AppConfig(preset=TINY_PRESET, runs_dir=tmp_path_factory.mktemp("runs"))
    demo = build_app(config)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_options(config))
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(app_url, wait_until="load")
        page.wait_for_selector("#generate", timeout=30_000)
        page.wait_for_function("document.querySelector('#prompts textarea').value.includes('{subject}')")
        yield page
        browser.close()


def upload(page, *paths: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#reference-upload")
    chooser.value.set_files([str(p) for p in paths])


def wait_for_column(page, expected: str) -> None:
    script = f"document.querySelector('#column-pick input').value === {expected!r}"
    try:
        page.wait_for_function(script, timeout=10_000)
    except Exception:
        raise AssertionError(f"column shown: {page.input_value('#column-pick input')!r}, expected {expected!r}")


def screenshot(page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    for _ in range(12):  # scroll through so lazy images load
        page.mouse.wheel(0, 500)
        page.wait_for_timeout(40)
    page.mouse.move(1, 1)
    page.wait_for_timeout(500)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_a_corrupt_upload_is_refused_with_an_error(page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes((REPO / "assets/chelsea.png").read_bytes()[:300])
    upload(page, broken)
    page.get_by_text("corrupt or truncated").first.wait_for(timeout=20_000)


def test_study_streams_the_grid_scores_and_frontier(page, tmp_path):
    upload(page, REPO / "assets/chelsea_crop.png")
    page.wait_for_function("[...document.querySelectorAll('#reference-gallery img')]"
                           ".some(i => !i.src.endsWith('chelsea.png'))", timeout=20_000)
    for kind in ("baseline", "textual_inversion", "dreambooth"):
        page.uncheck(f"#use-{kind} input")
    for kind in ("ip_adapter", "lora"):
        page.check(f"#use-{kind} input")
    page.fill("#weights-ip_adapter input", "0.3, 0.7")
    page.fill("#weights-lora input", "0.6, 1.0")
    page.fill("#prompts textarea", "a photo of a {subject} {class}")
    page.fill("#seeds input", "0, 1")
    page.click("#generate")

    page.wait_for_selector("#status .wb-progress.running", timeout=30_000)
    page.wait_for_selector("#status .wb-progress.done", timeout=90_000)
    assert "8 cells" in page.inner_text("#status")
    assert page.locator("#grid-image img").count() == 1
    labels = page.locator("#score-table [role=gridcell][data-col='0']")
    assert sorted(labels.all_inner_texts()) == ["ip_adapter@0.3", "ip_adapter@0.7", "lora@0.6", "lora@1"]
    page.wait_for_selector("#frontier .js-plotly-plot .scatterlayer .trace", timeout=10_000)
    assert page.locator("#column-gallery img").count() == 2  # the suggested column, one image per seed
    caption = page.locator("#column-gallery .caption-label").first.inner_text()
    assert caption.startswith("DINO ") and "seed 0" in caption  # scores first: a phone cuts the end

    # a click on a frontier marker opens that method@weight
    marker = page.locator("#frontier .scatterlayer .trace .points path").last
    marker.scroll_into_view_if_needed()
    box = marker.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y, steps=4)  # plotly picks the point under the hover first
    page.wait_for_timeout(300)
    page.mouse.click(x, y)
    wait_for_column(page, "lora@1")

    # a click on a table row does the same
    page.click("#score-table [data-testid='cell-0-0']")
    wait_for_column(page, "ip_adapter@0.3")

    # a click on a grid column does the same (the second column: ip_adapter@0.7)
    from workbench.grid import grid_layout

    layout = grid_layout(4, (64, 64), True)  # 4 columns of the tiny preset's 64 px images, one reference
    grid = page.locator("#grid-image img")
    grid.scroll_into_view_if_needed()
    box, natural = grid.bounding_box(), grid.evaluate("img => img.naturalWidth")
    assert natural == layout.left + 4 * (layout.size + layout.gap) + layout.gap
    scale = box["width"] / natural
    x = box["x"] + (layout.left + (layout.size + layout.gap) + layout.size / 2) * scale
    page.mouse.click(x, box["y"] + box["height"] * 0.7)
    wait_for_column(page, "ip_adapter@0.7")

    # the image-fidelity axis switches to CLIP-I
    page.get_by_label("CLIP-I").check()
    page.wait_for_function("[...document.querySelectorAll('#frontier .xtitle')].some(t => "
                           "t.textContent.startsWith('CLIP-I'))", timeout=10_000)

    screenshot(page, "ui_desktop.png", tmp_path)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(500)
    screenshot(page, "ui_phone.png", tmp_path)
    # on a phone nothing runs off the right edge: not the page, not the frontier's axis titles
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    plot = page.locator("#frontier .main-svg").first.bounding_box()
    for title in ("#frontier .xtitle", "#frontier .ytitle"):
        box = page.locator(title).bounding_box()
        assert plot["x"] <= box["x"] and box["x"] + box["width"] <= plot["x"] + plot["width"], title
    page.set_viewport_size({"width": 1280, "height": 800})


def test_stop_ends_a_long_job_within_seconds_and_says_what_is_kept(page):
    page.get_by_label("Steps").fill("200")  # tens of seconds a batch here: Stop must not wait for it
    page.get_by_label("Steps").press("Tab")
    page.click("#generate")
    page.wait_for_selector("#status .wb-progress.running", timeout=30_000)
    page.wait_for_timeout(1500)  # into the denoising loop
    started = time.perf_counter()
    page.click("#stop")
    page.wait_for_selector("#status .wb-progress.stopped", timeout=30_000)
    assert time.perf_counter() - started < 10
    assert "Press Generate to continue" in page.inner_text("#status")
    assert page.locator("#generate").is_enabled()
