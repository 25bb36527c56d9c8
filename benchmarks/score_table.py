"""Score-table cost per batch: the table grown by appending against the old rebuild after every batch.

    python benchmarks/score_table.py                 # table sizes 48 .. 12,000 rows of cells, batches of 8
    python benchmarks/score_table.py --sizes 48,480 --batch 4

Both ways score the same cells from the same embeddings (random unit vectors; no image is embedded,
so only the table's own work is timed), on the tiny scoring backbones' dimensions and the default
metrics (CLIP-I, CLIP-T, DINO, diversity). For each table size N:

- old ms: `RunScores.frame()` as it was before the append (stack every embedding, score every image,
  group every seed group, concat), which the runner called after every batch;
- new add ms: `RunScores.add` of the next batch (score its images, append their rows, rewrite its
  seed groups) on a table that already holds N cells;
- new read ms: the pandas frame built from the grown table (only when someone reads `result.scores`,
  e.g. the app's redraw; the CLI reads it once, at the end);
- ratio: old ms / new add ms.

Before timing, it checks that the table appended batch by batch and settled (`RunScores.finish`)
equals the old rebuild, bit for bit, dtypes included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WORKBENCH_DEVICE", "cpu")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from workbench.run_scores import SCORE_COLUMNS, RunScores, ScoringSpec, load_scorer  # noqa: E402
from workbench.spec import Cell, parse_study  # noqa: E402

SEEDS = 4


def old_frame(scores: RunScores, records: list[dict]) -> pd.DataFrame:
    """The table as `RunScores.frame()` rebuilt it after every batch before the append."""
    scorer = scores.scorer
    keys = [record["key"] for record in records]
    cells = pd.DataFrame(records)
    stacked = {kind: torch.stack([scores.embeddings[k][kind] for k in keys]) for kind in scores.embeddings[keys[0]]}
    frames = [cells.assign(metric=name, value=values.numpy())
              for name, values in scorer.score_embedded(stacked, scores.references).items()]
    group_rows = []
    for metric in scorer.group_metrics:
        for (prompt_index, method, weight), group in cells.groupby(["prompt_index", "method", "weight"], sort=False,
                                                                    dropna=False):
            subset = {kind: rows[group.index.to_list()] for kind, rows in stacked.items()}
            group_rows.append({"prompt_index": prompt_index, "prompt": group["prompt"].iloc[0], "method": method,
                               "kind": group["kind"].iloc[0], "weight": weight, "seed": None, "key": None,
                               "metric": metric.name, "value": metric.score_group(subset)})
    if group_rows:
        frames.append(pd.DataFrame(group_rows))
    return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]


def fake_results(count: int, study, dims: dict[str, int], scores_list: list[RunScores]) -> list:
    """`count` cell results (4 seeds per prompt x weight), with random embeddings put in every cache."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for index in range(count):
        cell = Cell(prompt_index=index // (SEEDS * 8), template=study.prompts[0], method_index=0,
                    weight=float(index // SEEDS % 8), seed=index % SEEDS)
        key = f"{index:064x}"
        embedding = {kind: torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
                     for kind, dim in dims.items()}
        for scores in scores_list:
            scores.embeddings[key] = embedding
        results.append(SimpleNamespace(cell=cell, key=key, method="lora", kind="lora"))
    return results


def millis(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="48,480,2400,12000", help="table sizes (cells) to time at")
    parser.add_argument("--batch", type=int, default=8, help="cells per batch")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    study = parse_study({"name": "bench", "base": "tiny", "prompts": ["a photo of a {subject} {class}"],
                         "subject": {"reference_images": [str(REPO / "assets/chelsea.png")], "class_noun": "cat"},
                         "methods": [{"kind": "baseline"}]})
    scorer = load_scorer(ScoringSpec.for_study(study), "cpu")
    folder = Path(tempfile.mkdtemp())
    reference = RunScores(scorer, study, folder)
    dims = {kind: rows.shape[1] for kind, rows in reference.references.items()}
    dims["clip_text"] = dims["clip_image"]

    # Appending, batch by batch, then settling, gives the old table bit for bit.
    appended = RunScores(scorer, study, folder)
    results = fake_results(480, study, dims, [appended])
    for start in range(0, len(results), args.batch):
        appended.add(results[start:start + args.batch])
    appended.table.replace_values(appended._score(appended.table.keys()))  # what finish() does before saving
    old = old_frame(appended, [appended._record(r) for r in results])
    pd.testing.assert_frame_equal(appended.frame(), old, check_exact=True)
    print(f"appended table == old rebuild, bit for bit ({len(old)} rows)\n")

    print(f"{'cells':>7} {'rows':>7} {'old ms/batch':>13} {'new add ms':>11} {'new read ms':>12} {'ratio':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        scores = RunScores(scorer, study, folder)
        extra = args.batch * (args.repeat + 1)
        results = fake_results(size + extra, study, dims, [scores])
        scores.add(results[:size])
        rows = len(scores.frame())  # long rows: 3 per cell plus one per seed group
        records = [scores._record(r) for r in results[:size]]
        old_ms = millis(lambda: old_frame(scores, records), args.repeat)
        batches = iter(range(size, size + extra, args.batch))
        new_ms = millis(lambda: scores.add(results[(b := next(batches)):b + args.batch]), args.repeat)
        read_ms = millis(lambda: (scores.table.__setattr__("_built", (-1, None)), scores.frame()), args.repeat)
        print(f"{size:>7} {rows:>7} {old_ms:>13.2f} {new_ms:>11.2f} {read_ms:>12.2f} {old_ms / new_ms:>7.1f}x")


if __name__ == "__main__":
    main()
