import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.frontier import pareto_front, summarize
from workbench.plots import IMAGE_CLOUD, frontier_figure, frontier_figure_with_x_menu, write_frontier_html

PROVENANCE = {
    "clip_i": {"axis": "image_fidelity", "direction": "higher is better",
               "backbone": "open_clip ViT-B-32 openai", "scale": "cosine in [-1, 1]"},
    "dino": {"axis": "image_fidelity", "direction": "higher is better",
             "backbone": "transformers facebook/dino-vits16", "scale": "cosine in [-1, 1]"},
    "clip_t": {"axis": "prompt_fidelity", "direction": "higher is better",
               "backbone": "open_clip ViT-B-32 openai", "scale": "cosine in [-1, 1]"},
}


def fake_scores(seed: int = 0) -> pd.DataFrame:
    """Two prompts x three seeds per cell; DINO rises and CLIP-T falls with weight."""
    rng = np.random.default_rng(seed)
    cells = [("baseline", 0.0, 0.30, 0.33)]
    cells += [("ip_adapter", w, 0.30 + 0.45 * w, 0.33 - 0.10 * w ** 2) for w in (0.25, 0.5, 0.75, 1.0)]
    cells += [("lora", w, 0.35 + 0.30 * w, 0.32 - 0.12 * w) for w in (1.0, 0.5)]  # weights out of order
    rows = []
    for method, weight, dino, clip_t in cells:
        for prompt in ("a photo of a dog", "a dog on the beach"):
            for seed in range(3):
                rows.append((prompt, method, weight, seed, "dino", dino + rng.normal(0, 0.03)))
                rows.append((prompt, method, weight, seed, "clip_t", clip_t + rng.normal(0, 0.01)))
            rows.append((prompt, method, weight, None, "diversity", 0.2 + rng.normal(0, 0.02)))
    return pd.DataFrame(rows, columns=["prompt", "method", "weight", "seed", "metric", "value"])


def traces_named(figure: go.Figure, name: str) -> list:
    return [trace for trace in figure.data if trace.name == name]


def test_frontier_figure_has_one_trace_per_method_with_std_error_bars_and_weight_labels():
    summary = summarize(fake_scores())

    figure = frontier_figure(summary, provenance=PROVENANCE)

    for method in ("baseline", "ip_adapter", "lora"):
        (trace,) = traces_named(figure, method)
        rows = summary[summary.method == method].sort_values("weight")
        assert trace.mode == "lines+markers+text"
        np.testing.assert_allclose(trace.x, rows["dino_mean"])
        np.testing.assert_allclose(trace.y, rows["clip_t_mean"])
        np.testing.assert_allclose(trace.error_x.array, rows["dino_std"])
        np.testing.assert_allclose(trace.error_y.array, rows["clip_t_std"])
        labels = ["" if method == "baseline" else f"{weight:g}" for weight in rows["weight"]]
        assert list(trace.text) == labels  # the baseline has no weight to show
    assert traces_named(figure, "lora")[0].text == ("0.5", "1")  # joined in weight order
    # neighbouring weights are labelled on opposite sides, so equal-looking points keep readable labels
    assert traces_named(figure, "lora")[0].textposition == ("top right", "bottom right")
    assert traces_named(figure, "baseline")[0].marker.symbol == "star"
    assert traces_named(figure, "ip_adapter")[0].marker.symbol == "circle"


def test_frontier_figure_draws_the_pareto_front_as_a_step_line_through_the_front_points():
    summary = summarize(fake_scores())

    (front,) = traces_named(frontier_figure(summary), "Pareto front")

    on_front = summary[pareto_front(summary, "dino_mean", "clip_t_mean")]
    assert front.line.shape == "hv"
    assert sorted(zip(front.x, front.y)) == sorted(zip(on_front["dino_mean"], on_front["clip_t_mean"]))
    assert list(front.x) == sorted(front.x, reverse=True)  # right to left: corners at (next x, this y)
    assert list(front.y) == sorted(front.y)


def test_frontier_axis_titles_name_the_metric_its_scale_what_it_measures_and_its_backbone():
    figure = frontier_figure(summarize(fake_scores()), provenance=PROVENANCE)

    assert figure.layout.xaxis.title.text == (
        "DINO (cosine in [-1, 1]) — image fidelity →<br><sup>transformers facebook/dino-vits16</sup>")
    assert figure.layout.yaxis.title.text == (
        "CLIP-T (cosine in [-1, 1]) — prompt fidelity →<br><sup>open_clip ViT-B-32 openai</sup>")
    assert frontier_figure(summarize(fake_scores())).layout.xaxis.title.text == "DINO"


def test_hover_shows_method_weight_n_mean_plus_minus_std_and_the_paired_interval():
    summary = summarize(fake_scores())

    (trace,) = traces_named(frontier_figure(summary), "ip_adapter")
    (baseline,) = traces_named(frontier_figure(summary), "baseline")

    row = summary[(summary.method == "ip_adapter") & (summary.weight == 0.5)].iloc[0]
    method, weight, dino, clip_t, n = trace.customdata[1]
    assert (method, weight, n) == ("ip_adapter", "0.5", "n = 6")
    paired = "against the baseline (95% t-interval, paired)"
    assert dino == (f"{row.dino_mean:.3f} ± {row.dino_std:.3f}, Δ {row.dino_delta:+.4f} "
                    f"[{row.dino_delta_lo:+.4f}, {row.dino_delta_hi:+.4f}] {paired}")
    assert clip_t == (f"{row.clip_t_mean:.3f} ± {row.clip_t_std:.3f}, Δ {row.clip_t_delta:+.4f} "
                      f"[{row.clip_t_delta_lo:+.4f}, {row.clip_t_delta_hi:+.4f}] {paired}")
    assert "%{customdata[4]}" in trace.hovertemplate
    assert "Δ" not in baseline.customdata[0][2]  # the baseline is the reference, not compared with itself


def test_a_baseline_labelled_control_keeps_its_star_and_colour():
    scores = fake_scores().replace({"method": {"baseline": "control"}})
    scores.insert(2, "kind", scores["method"].map({"control": "baseline"}).fillna(scores["method"]))

    figure = frontier_figure(summarize(scores))

    (control,) = traces_named(figure, "control")
    assert control.marker.symbol == "star" and control.marker.color == "#222222"
    assert traces_named(figure, "ip_adapter")[0].customdata[0][2].count("Δ") == 1


def test_per_image_cloud_is_faint_and_grouped_with_its_method():
    scores = fake_scores()

    figure = frontier_figure(summarize(scores), scores=scores)

    (cloud,) = traces_named(figure, "lora (images)")
    assert cloud.opacity == 0.15
    assert cloud.legendgroup == "lora" and cloud.showlegend is False
    lora = scores[(scores.method == "lora") & (scores.metric == "dino")]
    assert sorted(cloud.x) == sorted(lora["value"])
    assert len(figure.data) == 3 + 1 + 3  # clouds, front, methods


def test_frontier_html_is_self_contained(tmp_path):
    path = write_frontier_html(frontier_figure(summarize(fake_scores())), tmp_path / "frontier.html")

    html = path.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", html)  # nothing fetched: no CDN script tag
    assert "Pareto front" in html
    assert len(html) > 1_000_000  # plotly.js itself is inlined


def with_clip_i(scores: pd.DataFrame) -> pd.DataFrame:
    """`scores` plus a CLIP-I row per image that falls with DINO, so the two x axes have different fronts."""
    dino = scores[scores.metric == "dino"]
    return pd.concat([scores, dino.assign(metric="clip_i", value=1 - dino["value"])], ignore_index=True)


def test_frontier_menu_switches_x_between_dino_and_clip_i_with_and_without_the_image_dots():
    scores = with_clip_i(fake_scores())
    summary = summarize(scores)

    figure = frontier_figure_with_x_menu(summary, ["dino", "clip_i"], scores=scores, provenance=PROVENANCE)

    (menu,) = figure.layout.updatemenus
    assert [button.label for button in menu.buttons] == [
        "x = DINO, with each image", "x = DINO", "x = CLIP-I, with each image", "x = CLIP-I"]
    for button, x, dots in zip(menu.buttons, ["dino", "dino", "clip_i", "clip_i"], [True, False, True, False]):
        alone = frontier_figure(summary, x=x, scores=scores if dots else None, provenance=PROVENANCE)
        shown = [trace for trace, visible in zip(figure.data, button.args[0]["visible"]) if visible]
        assert [(t.name, tuple(t.x), tuple(t.y)) for t in shown] == [(t.name, tuple(t.x), tuple(t.y))
                                                                      for t in alone.data]
        assert button.args[1]["xaxis.title.text"] == alone.layout.xaxis.title.text
    assert [trace.visible for trace in figure.data] == list(menu.buttons[0].args[0]["visible"])
    assert sum(trace.meta == IMAGE_CLOUD for trace in figure.data) == 2 * 3
