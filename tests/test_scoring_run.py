"""Scores written by a run, and rescoring a run folder without generating."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_study

from workbench.run_scores import RunScores, ScoringSpec, load_scorer
from workbench.runner import run_study
from workbench.spec import parse_study

METHODS = [{"kind": "baseline"}, {"kind": "ip_adapter", "adapter": "tiny", "weights": [0.5, 1.0]},
           {"kind": "lora", "path": "tiny", "weights": [1.0]}]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_base):
    study = parse_study(tiny_study(prompts=["a photo of a {subject} {class}", "a {subject} {class} in the snow"],
                                   methods=METHODS))
    return run_study(study, tmp_path_factory.mktemp("scored"), loaded=tiny_base, show_progress_bar=False)


def test_run_writes_per_image_scores_summary_and_frontier(scored_run):
    out = scored_run.run_dir
    cells = pd.read_csv(out / "cells.csv")
    assert {"clip_i", "clip_t", "dino"} <= set(cells.columns)
    assert cells[["clip_i", "clip_t", "dino"]].notna().all().all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(zip(summary["method"], summary["weight"])) == [("baseline", 0.0), ("ip_adapter", 0.5),
                                                                ("ip_adapter", 1.0), ("lora", 1.0)]
    assert (summary["dino_n"] == 4).all() and (summary["diversity_n"] == 2).all()
    assert summary["on_pareto_front"].any()
    html = (out / "frontier.html").read_text()
    assert "Pareto front" in html and "plotly" in html.lower()
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["metric"]) == {"clip_i", "clip_t", "dino", "diversity"}


def test_summary_csv_has_the_paired_difference_against_the_baseline_and_variance_csv_its_shares(scored_run):
    import json

    from workbench.stats import mean_interval

    out = scored_run.run_dir
    summary = pd.read_csv(out / "summary.csv")
    cells = pd.read_csv(out / "cells.csv")
    for metric in ("clip_i", "clip_t", "dino", "diversity"):
        assert {f"{metric}_delta", f"{metric}_delta_lo", f"{metric}_delta_hi", f"{metric}_delta_n"} <= set(summary)
    assert summary.loc[summary.method == "baseline", "dino_delta"].isna().all()
    # by definition: lora@1 minus the baseline on the same (prompt, seed), t-interval over the 4 pairs
    cell = ["prompt_index", "seed"]
    lora = cells[cells.method == "lora"].set_index(cell)["dino"]
    baseline = cells[cells.method == "baseline"].set_index(cell)["dino"]
    delta, low, high, n = mean_interval((lora - baseline).to_numpy())
    row = summary[summary.method == "lora"].iloc[0]
    assert n == 4
    assert (row["dino_delta"], row["dino_delta_lo"], row["dino_delta_hi"], row["dino_delta_n"]) == (
        pytest.approx(delta, abs=1e-6), pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6), 4)
    assert (summary["diversity_delta_n"][summary.method != "baseline"] == 2).all()  # paired by prompt
    assert set(pd.read_csv(out / "scores.csv")["kind"]) == {"baseline", "ip_adapter", "lora"}
    variance = pd.read_csv(out / "variance.csv")
    assert set(variance["metric"]) == {"clip_i", "clip_t", "dino"}
    assert variance.groupby("metric")["share"].sum().to_numpy() == pytest.approx([1.0, 1.0, 1.0])
    columns = json.loads((out / "manifest.json").read_text())["columns"]
    assert "t-interval" in columns["summary.csv"]["<metric>_delta_lo"] and "share" in columns["variance.csv"]


def test_cells_csv_scores_equal_the_metric_on_the_saved_image(scored_run, tiny_base):
    from PIL import Image

    from workbench.images import load_image

    scorer = load_scorer(ScoringSpec.for_study(scored_run.study))
    cells = pd.read_csv(scored_run.run_dir / "cells.csv")
    row = cells.iloc[3]
    image = Image.open(scored_run.run_dir / row["image"]).convert("RGB")
    reference = load_image(scored_run.study.subject.reference_images[0])
    scores = scorer.score_images([image], [row["scoring_prompt"]], scorer.embed_references([reference]))
    for metric in ("clip_i", "clip_t", "dino"):
        assert scores[metric].item() == pytest.approx(row[metric], abs=1e-5)
    assert "sks" not in row["scoring_prompt"]


def test_cells_csv_diversity_is_the_value_of_each_image_seed_group(scored_run):
    cells = pd.read_csv(scored_run.run_dir / "cells.csv")
    scores = pd.read_csv(scored_run.run_dir / "scores.csv")
    groups = scores[scores.metric == "diversity"]

    assert len(groups) == 8 and cells["diversity"].notna().all()
    for _, group in groups.iterrows():
        rows = cells[(cells.prompt_index == group.prompt_index) & (cells.method == group.method)
                     & (cells.weight == group.weight)]
        assert len(rows) == 2 and (rows["diversity"] == group.value).all()


def test_manifest_states_scoring_cost_per_image_and_how_to_read_the_summary(scored_run):
    import json

    manifest = json.loads((scored_run.run_dir / "manifest.json").read_text())
    run = manifest["runs"][-1]
    cost = run["scoring"]
    generation = sum(m["seconds"] for m in run["methods"].values()) / sum(m["images"] for m in run["methods"].values())

    assert cost["images_embedded"] == 16 and cost["seconds"] == pytest.approx(scored_run.scoring_seconds, abs=1e-3)
    assert cost["seconds_per_image"] == pytest.approx(cost["seconds"] / 16, rel=1e-2)
    assert cost["images_per_second"] == pytest.approx(16 / cost["seconds"], rel=1e-2)
    assert cost["ratio_per_image"] == pytest.approx(cost["seconds_per_image"] / generation, rel=1e-2)
    assert run["scoring_to_generation_ratio"] == cost["ratio_per_image"]
    summary = manifest["columns"]["summary.csv"]
    assert "ddof=1" in summary["<metric>_std"] and "seed groups" in summary["<metric>_n"]
    assert "dino_mean and clip_t_mean" in summary["on_pareto_front"]
    assert set(manifest["metrics"]["dino"]) == {"axis", "direction", "backbone", "scale"}


def test_progress_events_carry_the_scores_so_far(tmp_path, tiny_base):
    study = parse_study(tiny_study(methods=METHODS[:2]))
    seen = []
    run_study(study, tmp_path, loaded=tiny_base, show_progress_bar=False,
              progress=lambda event: seen.append(len(event.run.scores.dropna(subset=["key"])) // 3))
    assert seen == [1, 2, 3, 4, 5, 6]


def test_rescoring_reuses_cached_embeddings(scored_run, monkeypatch):
    scorer = load_scorer(ScoringSpec.for_study(scored_run.study))
    calls = []
    original = scorer.embed_images
    monkeypatch.setattr(scorer, "embed_images", lambda images, prompts: calls.append(len(images)) or original(images, prompts))
    again = RunScores(scorer, scored_run.study, scored_run.run_dir)
    again.add(scored_run.results)
    assert calls == []
    pd.testing.assert_frame_equal(again.frame().reset_index(drop=True), scored_run.scores.reset_index(drop=True))


def test_score_cli_rescores_without_generating(scored_run):
    out = scored_run.run_dir
    images = sorted(out.glob("images/*/*.png"))
    mtimes = [p.stat().st_mtime_ns for p in images]
    (out / "summary.csv").unlink()
    (out / "frontier.html").unlink()
    done = subprocess.run([sys.executable, "-m", "workbench", "score", str(out), "--metrics", "clip_i,clip_t,dino"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rescored 16/16 cells" in done.stdout and "suggested:" in done.stdout
    assert "Δ DINO" in done.stdout and "variance of each metric" in done.stdout
    assert "DINO: prompt " in done.stdout and "method@weight" in done.stdout
    assert (out / "summary.csv").is_file() and (out / "frontier.html").is_file()
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("images/*/*.png"))] == mtimes
    assert "diversity_mean" not in pd.read_csv(out / "summary.csv").columns


def test_score_cli_on_a_folder_that_is_not_a_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "workbench", "score", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "no manifest.json" in done.stderr


def test_unknown_metric_is_refused_before_generating(tmp_path, tiny_base):
    from workbench.errors import StudyError

    study = parse_study(tiny_study())
    with pytest.raises(StudyError, match=r"metrics: unknown metric 'fid'"):
        run_study(study, tmp_path, loaded=tiny_base, scoring=ScoringSpec(("fid",)), show_progress_bar=False)
    assert not list(tmp_path.glob("images/*/*.png"))


def test_the_score_table_grows_by_appending_the_rows_of_each_batch(tmp_path, tiny_base, monkeypatch):
    from workbench.run_scores import ScoreTable

    added, grouped = [], []
    add, set_group = ScoreTable.add, ScoreTable.set_group
    monkeypatch.setattr(ScoreTable, "add", lambda self, cells, *a: added.append(list(cells)) or add(self, cells, *a))
    monkeypatch.setattr(ScoreTable, "set_group", lambda self, m, group, row: grouped.append(group)
                        or set_group(self, m, group, row))
    study = parse_study(tiny_study(seeds=[0, 1, 2], methods=METHODS[:2]))  # 9 cells, batches of one
    frames = []
    run_study(study, tmp_path, loaded=tiny_base, batch_size=1, show_progress_bar=False,
              progress=lambda event: frames.append(event.run.scores))
    # Each batch builds the rows of its own cell and rewrites one seed group; nothing earlier is rebuilt.
    assert [len(cells) for cells in added] == [1] * 9 and len({c for cells in added for c in cells}) == 9
    assert len(grouped) == 9 and len(set(grouped)) == 3
    per_image = [frame.dropna(subset=["key"]).set_index(["key", "metric"])["value"] for frame in frames]
    assert [len(values) for values in per_image] == [3 * n for n in range(1, 10)]
    for earlier, later in zip(per_image, per_image[1:]):
        assert later.loc[earlier.index].equals(earlier)  # earlier rows are left as they were


def test_a_table_appended_batch_by_batch_equals_one_scored_in_one_pass(scored_run, tmp_path):
    import shutil

    run_dir = shutil.copytree(scored_run.run_dir, tmp_path / "run")
    scorer = load_scorer(ScoringSpec.for_study(scored_run.study))
    appended, at_once = RunScores(scorer, scored_run.study, run_dir), RunScores(scorer, scored_run.study, run_dir)
    for result in scored_run.results:
        appended.add([result])
    at_once.add(scored_run.results)
    appended.finish()
    pd.testing.assert_frame_equal(appended.frame(), at_once.frame(), check_exact=True)


def test_score_run_scores_a_run_folder_without_generating(scored_run, tmp_path):
    import shutil

    from workbench.runner import score_run

    run_dir = shutil.copytree(scored_run.run_dir, tmp_path / "run")
    (run_dir / "scores.csv").unlink()
    images = {p: p.stat().st_mtime_ns for p in run_dir.glob("images/*/*.png")}
    spec = ScoringSpec.for_study(scored_run.study, metrics=["clip_i", "dino"])
    result = score_run(run_dir, scoring=spec)  # the study comes from the folder's manifest.json
    assert result.generated == 0 and result.complete and not result.stats
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("images/*/*.png")} == images
    scores = pd.read_csv(run_dir / "scores.csv")
    assert set(scores["metric"]) == {"clip_i", "dino"} and len(scores) == 2 * 16
    before = scored_run.scores.set_index(["key", "metric"])["value"]
    after = result.scores.set_index(["key", "metric"])["value"]
    assert after.to_numpy() == pytest.approx(before.loc[after.index].to_numpy(), abs=1e-6)


def test_score_run_that_finds_none_of_the_cells_keeps_the_folder_as_it_was(scored_run, tmp_path, monkeypatch):
    """A run made elsewhere (another device type, another copy of the weights) has other cell keys here."""
    import shutil
    from pathlib import Path

    from workbench import runner
    from workbench.errors import StudyError
    from workbench.runner import score_run

    run = Path(shutil.copytree(scored_run.run_dir, tmp_path / "run"))
    before = {name: (run / name).read_bytes() for name in ("cells.csv", "manifest.json", "scores.csv")}
    monkeypatch.setattr(runner, "base_identity", lambda base: {"tiny": base, "version": "made elsewhere"})
    with pytest.raises(StudyError, match=r"found none of its \d+ cells"):
        score_run(run)
    assert {name: (run / name).read_bytes() for name in before} == before
