import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest

from workbench.frontier import pareto_front, suggest_weight, summarize


def brute_force_front(xs, ys) -> list[bool]:
    front = []
    for i in range(len(xs)):
        dominated = False
        for j in range(len(xs)):
            if j == i or np.isnan(xs[j]) or np.isnan(ys[j]):
                continue
            if xs[j] >= xs[i] and ys[j] >= ys[i] and (xs[j] > xs[i] or ys[j] > ys[i]):
                dominated = True
        front.append(not dominated and not (np.isnan(xs[i]) or np.isnan(ys[i])))
    return front


def long_scores(rows) -> pd.DataFrame:
    """rows: (prompt, method, weight, seed, metric, value)."""
    return pd.DataFrame(rows, columns=["prompt", "method", "weight", "seed", "metric", "value"])


def test_pareto_front_on_a_hand_made_table_with_ties_and_a_dominated_duplicate():
    points = pd.DataFrame({
        "x": [0.9, 0.5, 0.5, 0.7, 0.7, 0.2, 0.9, 0.3, 0.3, np.nan],
        "y": [0.1, 0.6, 0.6, 0.3, 0.2, 0.6, 0.1, 0.4, 0.4, 0.9],
    }, index=list("abcdefghij"))
    # a and g tie on the front; b and c tie on the front; f equals b on y with less x: dominated;
    # e is dominated by d (same x, less y); h and i are duplicates behind b; j has no x.
    expected = pd.Series([True, True, True, True, False, False, True, False, False, False],
                         index=points.index, name="on_pareto_front")

    mask = pareto_front(points, "x", "y")

    pd.testing.assert_series_equal(mask, expected)
    assert mask.tolist() == brute_force_front(points["x"].to_numpy(), points["y"].to_numpy())


def test_pareto_front_matches_brute_force_on_a_random_table():
    rng = np.random.default_rng(7)
    # Values on a coarse grid so that ties on one or both coordinates are common.
    points = pd.DataFrame({"x": rng.integers(0, 8, 60) / 8, "y": rng.integers(0, 8, 60) / 8})

    mask = pareto_front(points, "x", "y")

    assert mask.tolist() == brute_force_front(points["x"].to_numpy(), points["y"].to_numpy())
    assert mask.any()


def test_summary_mean_std_n_equal_numpy_by_hand():
    rows = []
    values = {
        ("lora", 0.5): {"dino": [0.6, 0.7, 0.8, 0.9], "clip_t": [0.30, 0.28, 0.25, 0.27]},
        ("lora", 1.0): {"dino": [0.8, 0.85, 0.9, 0.95], "clip_t": [0.20, 0.22, 0.21, 0.19]},
        ("baseline", 0.0): {"dino": [0.3, 0.35, 0.4, 0.2], "clip_t": [0.33, 0.32, 0.31, 0.34]},
    }
    for (method, weight), by_metric in values.items():
        for metric, metric_values in by_metric.items():
            for index, value in enumerate(metric_values):
                prompt, seed = ("a dog", "a dog on the beach")[index % 2], index // 2
                rows.append((prompt, method, weight, seed, metric, value))
        rows.append(("a dog", method, weight, None, "diversity", 0.1 * weight + 0.05))
    scores = long_scores(rows)

    summary = summarize(scores)

    assert summary[["method", "weight"]].values.tolist() == [["lora", 0.5], ["lora", 1.0], ["baseline", 0.0]]
    for (method, weight), by_metric in values.items():
        row = summary[(summary.method == method) & (summary.weight == weight)].iloc[0]
        for metric, metric_values in by_metric.items():
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(metric_values), abs=1e-12)
            assert row[f"{metric}_std"] == pytest.approx(np.std(metric_values, ddof=1), abs=1e-12)
            assert row[f"{metric}_n"] == len(metric_values)
        assert row["diversity_n"] == 1
        assert np.isnan(row["diversity_std"])
    # lora@0.5 (0.75, 0.275) is dominated by nothing, lora@1 has the best DINO, baseline the best CLIP-T.
    assert summary["on_pareto_front"].tolist() == [True, True, True]


def test_summary_pareto_flag_uses_the_chosen_axes():
    scores = long_scores([
        ("p", "a", 1.0, 0, "dino", 0.5), ("p", "a", 1.0, 0, "clip_t", 0.2), ("p", "a", 1.0, 0, "clip_i", 0.9),
        ("p", "b", 1.0, 0, "dino", 0.6), ("p", "b", 1.0, 0, "clip_t", 0.3), ("p", "b", 1.0, 0, "clip_i", 0.8),
    ])

    assert summarize(scores)["on_pareto_front"].tolist() == [False, True]
    assert summarize(scores, x="clip_i", y="clip_t")["on_pareto_front"].tolist() == [True, True]


def test_summary_of_an_unscored_axis_says_which_metrics_exist():
    scores = long_scores([("p", "a", 1.0, 0, "clip_i", 0.9), ("p", "a", 1.0, 0, "clip_t", 0.2)])

    with pytest.raises(ValueError, match="x='dino' was not scored.*clip_i, clip_t"):
        summarize(scores)


def sweep_summary() -> pd.DataFrame:
    rows = []
    for weight, dino, clip_t in [(0.25, 0.40, 0.31), (0.5, 0.55, 0.29), (0.75, 0.65, 0.26), (1.0, 0.72, 0.22)]:
        for seed, jitter in enumerate((-0.01, 0.01)):
            rows += [("p", "ip_adapter", weight, seed, "dino", dino + jitter),
                     ("p", "ip_adapter", weight, seed, "clip_t", clip_t - jitter)]
    return summarize(long_scores(rows))


def test_suggested_weight_has_the_best_clip_t_among_weights_above_the_dino_floor():
    suggestion = suggest_weight(sweep_summary(), "ip_adapter", min_x=0.6)

    assert suggestion.weight == 0.75
    assert suggestion.optimised == "clip_t" and suggestion.constrained == "dino"
    assert suggestion.optimised_mean == pytest.approx(0.26)
    assert suggestion.constrained_mean == pytest.approx(0.65)
    assert suggestion.n == 2
    assert suggestion.sentence.startswith("ip_adapter at weight 0.75 gives the best CLIP-T (0.260 ± 0.014, n=2)")
    assert "among weights with DINO ≥ 0.600; at this weight DINO is 0.650 ± 0.014." in suggestion.sentence


def test_suggested_weight_with_a_clip_t_floor_has_the_best_dino():
    assert suggest_weight(sweep_summary(), "ip_adapter", min_y=0.28).weight == 0.5


def test_no_suggestion_when_no_weight_meets_the_floor():
    assert suggest_weight(sweep_summary(), "ip_adapter", min_x=0.9) is None
    assert suggest_weight(sweep_summary(), "lora", min_x=0.1) is None


def test_suggest_weight_needs_exactly_one_floor():
    with pytest.raises(ValueError, match="exactly one"):
        suggest_weight(sweep_summary(), "ip_adapter")
    with pytest.raises(ValueError, match="exactly one"):
        suggest_weight(sweep_summary(), "ip_adapter", min_x=0.5, min_y=0.2)


def test_suggestions_give_both_directions_with_the_baseline_as_the_floor():
    from workbench.report import suggestions

    rows = [("p", "baseline", 0.0, seed, metric, value) for seed in (0, 1)
            for metric, value in (("dino", 0.45), ("clip_t", 0.30))]
    for weight, dino, clip_t in [(0.25, 0.40, 0.31), (0.5, 0.55, 0.29), (0.75, 0.65, 0.26), (1.0, 0.72, 0.22)]:
        rows += [("p", "ip_adapter", weight, seed, metric, value) for seed in (0, 1)
                 for metric, value in (("dino", dino), ("clip_t", clip_t))]
    summary = summarize(long_scores(rows))

    keep_dino, keep_clip_t = suggestions(summary, "dino", "clip_t")

    # Every seed gives the same value here, so each interval is the single point delta: 0.25 loses
    # 0.05 DINO against the baseline and is out; 0.5 keeps it and has the best CLIP-T of the rest.
    assert (keep_dino.weight, keep_dino.constrained, keep_dino.against_baseline) == (0.5, "dino", True)
    assert (keep_clip_t.weight, keep_clip_t.constrained) == (0.25, "clip_t")
    assert "DINO is not significantly below the baseline's" in keep_dino.sentence
    assert "DINO 0.550, Δ +0.1000 [+0.1000, +0.1000] over 2 pairs, above the baseline" in keep_dino.sentence
    (given,) = suggestions(summary, "dino", "clip_t", min_x=0.7, min_y=0.5)
    assert given.weight == 1.0 and "(given)" in given.sentence


def with_baseline(values: dict, baseline_label: str = "baseline") -> pd.DataFrame:
    """values: {(method, weight): {metric: [value per (prompt, seed) cell]}} over 2 prompts x 2 seeds;
    the first entry is the baseline (kind "baseline", whatever its label)."""
    rows = []
    for index, ((method, weight), by_metric) in enumerate(values.items()):
        label, kind = (baseline_label, "baseline") if index == 0 else (method, method)
        for metric, cells in by_metric.items():
            for cell, value in enumerate(cells):
                rows.append((cell // 2, f"prompt {cell // 2}", label, kind, weight, cell % 2, metric, value))
    return pd.DataFrame(rows, columns=["prompt_index", "prompt", "method", "kind", "weight", "seed", "metric", "value"])


# The baseline's DINO differs a lot between prompts; textual inversion's differs from it by a few
# 1e-4 per cell, in both directions, and by -0.00001 on average.
BASELINE_DINO = [0.30, 0.31, 0.62, 0.60]
TI_DINO = [b + d for b, d in zip(BASELINE_DINO, [0.0005, -0.0007, 0.0004, -0.00024])]


def test_a_weight_whose_interval_holds_zero_is_not_distinguishable_and_still_eligible():
    from workbench.report import suggestions

    summary = summarize(with_baseline({
        ("baseline", 0.0): {"dino": BASELINE_DINO, "clip_t": [0.25, 0.26, 0.30, 0.31]},
        ("textual_inversion", 1.0): {"dino": TI_DINO, "clip_t": [0.27, 0.28, 0.31, 0.33]},
    }))
    ti = summary[summary.method == "textual_inversion"].iloc[0]
    baseline = summary[summary.method == "baseline"].iloc[0]

    assert ti["dino_mean"] < baseline["dino_mean"]  # the point rule of mean >= the baseline's excluded it
    assert ti["dino_delta"] == pytest.approx(-0.00001, abs=1e-12)
    assert ti["dino_delta_lo"] < 0 < ti["dino_delta_hi"]
    (keep_dino, _) = suggestions(summary, "dino", "clip_t")
    assert (keep_dino.method, keep_dino.constrained) == ("textual_inversion", "dino")
    # sd of the differences 5.649e-4, so the half width is 3.182446 * 5.649e-4 / 2 = 8.99e-4
    assert ("DINO 0.457, Δ -0.0000 [-0.0009, +0.0009] over 4 pairs, not distinguishable from the baseline."
            in keep_dino.sentence)
    assert "CLIP-T 0.298, Δ +0.0175 [+0.0095, +0.0255] over 4 pairs, above the baseline" in keep_dino.sentence


def test_a_weight_significantly_below_the_baseline_is_not_suggested():
    from workbench.report import suggestions

    summary = summarize(with_baseline({
        ("baseline", 0.0): {"dino": BASELINE_DINO, "clip_t": [0.25, 0.26, 0.30, 0.31]},
        ("lora", 1.0): {"dino": [b - 0.002 + 0.0001 * i for i, b in enumerate(BASELINE_DINO)],
                        "clip_t": [0.27, 0.28, 0.31, 0.33]},
    }))

    assert [s.constrained for s in suggestions(summary, "dino", "clip_t")] == ["clip_t"]


def test_a_baseline_labelled_control_still_gives_suggestions():
    from workbench.report import suggestions

    summary = summarize(with_baseline({
        ("baseline", 0.0): {"dino": BASELINE_DINO, "clip_t": [0.25, 0.26, 0.30, 0.31]},
        ("textual_inversion", 1.0): {"dino": TI_DINO, "clip_t": [0.27, 0.28, 0.31, 0.33]},
    }, baseline_label="control"))

    found = suggestions(summary, "dino", "clip_t")
    assert [(s.method, s.constrained) for s in found] == [("textual_inversion", "dino"),
                                                          ("textual_inversion", "clip_t")]


def test_with_one_pair_a_weight_qualifies_by_its_difference_and_the_sentence_says_no_interval():
    scores = with_baseline({("baseline", 0.0): {"dino": [0.5], "clip_t": [0.3]},
                            ("lora", 1.0): {"dino": [0.5], "clip_t": [0.32]}})

    suggestion = suggest_weight(summarize(scores), "lora", keep="dino")

    assert suggestion.weight == 1.0
    assert "DINO 0.500, Δ +0.0000 (1 pair: no interval) against the baseline." in suggestion.sentence
