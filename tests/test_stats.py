"""Paired differences against the baseline, their t-intervals, and the variance decomposition."""

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest

from workbench.frontier import summarize
from workbench.stats import delta_text, mean_interval, paired_deltas, t_quantile, variance_shares, verdict

COLUMNS = ["prompt_index", "prompt", "method", "kind", "weight", "seed", "metric", "value"]


@pytest.mark.parametrize("p, df, expected", [
    # Student t table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2), and the two closed forms:
    # df=1 is Cauchy, tan(pi (p - 1/2)); df=2 is (2p - 1) / sqrt(2 p (1 - p)).
    (0.975, 3, 3.182446), (0.975, 10, 2.228139), (0.975, 30, 2.042272), (0.995, 5, 4.032143),
    (0.95, 20, 1.724718), (0.975, 1, math.tan(math.pi * 0.475)), (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),
    (0.025, 3, -3.182446), (0.5, 7, 0.0),
])
def test_t_quantile_equals_the_tables_and_closed_forms(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-6)


def test_t_quantile_tends_to_the_normal_quantile_for_large_df():
    assert t_quantile(0.975, 1_000_000) == pytest.approx(1.959964, abs=1e-5)


def test_mean_interval_of_four_differences_is_the_t_interval_by_hand():
    # mean 0.025; sd = sqrt(0.0005 / 3); half width = t(0.975, 3) * sd / sqrt(4)
    half = 3.182446 * math.sqrt(0.0005 / 3) / 2

    mean, low, high, n = mean_interval([0.01, 0.03, 0.02, 0.04])

    assert (mean, n) == (pytest.approx(0.025), 4)
    assert (low, high) == (pytest.approx(0.025 - half, abs=1e-8), pytest.approx(0.025 + half, abs=1e-8))
    assert half == pytest.approx(0.0205426, abs=1e-7)


def test_one_difference_has_no_interval_and_the_text_says_so():
    mean, low, high, n = mean_interval([0.02, np.nan])

    assert (mean, n) == (0.02, 1) and math.isnan(low) and math.isnan(high)
    assert delta_text(mean, low, high, n) == "Δ +0.0200 (1 pair: no interval)"
    assert verdict(low, high) == ""
    assert delta_text(math.nan, math.nan, math.nan, 0) == ""


def test_verdict_reads_an_interval_holding_zero_as_not_distinguishable():
    assert verdict(-0.001, 0.002) == "not distinguishable from the baseline"
    assert verdict(0.001, 0.002) == "above the baseline"
    assert verdict(-0.003, -0.001) == "below the baseline"


def paired_table(shift: dict, baseline: str = "baseline") -> pd.DataFrame:
    """2 prompts x 3 seeds; the baseline's value varies a lot by prompt and seed, and each other
    method@weight adds shift[(method, weight)][cell] to it, cell by cell. Rows are shuffled."""
    rows = []
    base = {(p, s): 0.2 + 0.3 * p + 0.05 * s for p in range(2) for s in range(3)}
    for (p, s), value in base.items():
        rows.append((p, f"prompt {p}", baseline, "baseline", 0.0, s, "dino", value))
        for (method, weight), by_cell in shift.items():
            rows.append((p, f"prompt {p}", method, method, weight, s, "dino", value + by_cell[p * 3 + s]))
    for p in range(2):
        rows.append((p, f"prompt {p}", baseline, "baseline", 0.0, None, "diversity", 0.1 + p))
        for (method, weight), by_cell in shift.items():
            rows.append((p, f"prompt {p}", method, method, weight, None, "diversity", 0.1 + p + by_cell[p]))
    return pd.DataFrame(rows, columns=COLUMNS).sample(frac=1.0, random_state=3).reset_index(drop=True)


def test_paired_delta_is_the_mean_of_the_cell_by_cell_differences_with_its_t_interval():
    shifts = [0.010, 0.012, 0.008, 0.011, 0.009, 0.010]
    scores = paired_table({("lora", 0.5): shifts})

    deltas = paired_deltas(scores).set_index("metric")

    dino = deltas.loc["dino"]
    mean, low, high, n = mean_interval(shifts)
    half = 2.570582 * np.std(shifts, ddof=1) / math.sqrt(6)  # t(0.975, 5)
    assert (dino["method"], dino["weight"], dino["delta_n"]) == ("lora", 0.5, 6)
    assert dino["delta"] == pytest.approx(np.mean(shifts), abs=1e-12)
    assert (dino["delta_lo"], dino["delta_hi"]) == (pytest.approx(mean - half, abs=1e-8),
                                                    pytest.approx(mean + half, abs=1e-8))
    # diversity is one value per prompt: paired by prompt, two pairs
    diversity = deltas.loc["diversity"]
    assert diversity["delta_n"] == 2 and diversity["delta"] == pytest.approx(np.mean(shifts[:2]))


def test_summary_has_delta_columns_empty_on_the_baseline_row():
    scores = paired_table({("lora", 0.5): [0.01] * 6, ("lora", 1.0): [0.03, 0.01, 0.02, 0.04, 0, 0]})

    summary = summarize(scores, y="diversity")

    baseline = summary[summary.method == "baseline"].iloc[0]
    assert math.isnan(baseline["dino_delta"]) and baseline["dino_delta_n"] == 0
    lora = summary[(summary.method == "lora") & (summary.weight == 1.0)].iloc[0]
    assert lora["dino_delta"] == pytest.approx(0.1 / 6)
    _, low, high, _ = mean_interval([0.03, 0.01, 0.02, 0.04, 0, 0])
    assert (lora["dino_delta_lo"], lora["dino_delta_hi"]) == (pytest.approx(low), pytest.approx(high))
    assert list(summary.columns[:3]) == ["method", "kind", "weight"]
    assert [c for c in summary.columns if c.startswith("dino_")] == [
        "dino_mean", "dino_std", "dino_n", "dino_delta", "dino_delta_lo", "dino_delta_hi", "dino_delta_n"]


def test_the_baseline_is_found_by_kind_not_by_its_label():
    summary = summarize(paired_table({("lora", 0.5): [0.01] * 6}, baseline="control"), y="diversity")

    lora = summary[summary.method == "lora"].iloc[0]
    assert lora["dino_delta"] == pytest.approx(0.01) and lora["dino_delta_n"] == 6


def test_without_a_baseline_the_delta_columns_are_empty():
    scores = paired_table({("lora", 0.5): [0.01] * 6})
    summary = summarize(scores[scores.kind != "baseline"], y="diversity")

    assert summary["dino_delta"].isna().all() and (summary["dino_delta_n"] == 0).all()


def balanced_table(noise: float = 0.05) -> pd.DataFrame:
    """2 prompts x 2 seeds x 2 method@weights; value = 0.5 ± 0.3 (prompt) ± 0.1 (seed) ± 0.2
    (method@weight) ± noise (the three-way sign, orthogonal to every main effect)."""
    rows = []
    for p in (0, 1):
        for s in (0, 1):
            for m, (method, weight) in enumerate((("baseline", 0.0), ("lora", 1.0))):
                sign = [-1, 1]
                value = 0.5 + 0.3 * sign[p] + 0.1 * sign[s] + 0.2 * sign[m] + noise * sign[p] * sign[s] * sign[m]
                rows.append((p, f"prompt {p}", method, method, weight, s, "clip_t", value))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_variance_shares_equal_the_sums_of_squares_by_hand_and_sum_to_one():
    # each source's SS = 8 values x effect^2: 0.72, 0.08, 0.32, and 0.02 left over; total 1.14
    shares = variance_shares(balanced_table()).set_index("source")["share"]

    assert list(shares.index) == ["prompt", "seed", "method@weight", "residual"]
    np.testing.assert_allclose(shares.to_numpy(), [0.72 / 1.14, 0.08 / 1.14, 0.32 / 1.14, 0.02 / 1.14], atol=1e-12)
    assert shares.sum() == pytest.approx(1.0)


def test_variance_shares_leave_out_a_method_weight_missing_a_cell_and_group_metrics():
    scores = pd.concat([balanced_table(), pd.DataFrame(
        [(0, "prompt 0", "ti", "textual_inversion", 1.0, 0, "clip_t", 0.9),
         (0, "prompt 0", "ti", "textual_inversion", 1.0, None, "diversity", 0.1)], columns=COLUMNS)])

    shares = variance_shares(scores)

    assert set(shares["metric"]) == {"clip_t"} and (shares["n"] == 8).all()
    np.testing.assert_allclose(shares["share"].to_numpy(), [0.72 / 1.14, 0.08 / 1.14, 0.32 / 1.14, 0.02 / 1.14])


def test_variance_shares_of_a_constant_metric_are_undefined():
    scores = balanced_table().assign(value=0.3)

    assert variance_shares(scores)["share"].isna().all()
