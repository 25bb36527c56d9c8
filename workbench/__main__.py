"""Command line: `python -m workbench run presets/NAME.yaml --out runs/NAME`.

`--plugin MODULE` (repeatable; also $WORKBENCH_PLUGINS) imports a module that registers methods or
metrics; `python -m workbench metrics` lists the registered metrics.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _run(args) -> int:
    from .runner import run_study
    from .spec import load_study

    study = load_study(args.preset, max_cells=args.max_cells)
    out = Path(args.out or Path("runs") / study.name)
    _warn_long_prompts(study)
    result = run_study(study, out, batch_size=args.batch_size, device=args.device, offload=args.offload,
                       score=not args.no_score, scoring=_scoring(study, args))
    cached = len(result.results) - result.generated
    print(f"{study.name}: {result.generated} generated, {cached} cached, "
          f"{len(result.results)}/{len(study.cells())} cells in {result.wall_seconds:.1f} s -> {out}")
    _print_scores(result)
    if result.stopped:
        print("stopped: run the same command again to generate the missing cells", file=sys.stderr)
        return 130
    return 0


def _warn_long_prompts(study) -> None:
    from .prompts import truncation_warnings

    for line in truncation_warnings(study):
        print(f"warning: {line}", file=sys.stderr)


def _scoring(study, args):
    from .run_scores import ScoringSpec

    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    return ScoringSpec.for_study(study, metrics=metrics, clip=args.clip)


def _print_scores(result) -> None:
    from .frontier import frontier_axes
    from .report import scoring_cost, suggestions

    if result.scores is None or result.scores.empty:
        return
    backbones = ", ".join(f"{name}: {meta['backbone']}" for name, meta in result.provenance.items())
    print(f"scored {len(result.results)} images in {result.scoring_seconds:.2f} s ({backbones})")
    cost = scoring_cost(result, [])
    if cost["ratio_per_image"] is not None:
        print(f"scoring cost: {cost['seconds_per_image'] * 1000:.1f} ms per image, "
              f"{cost['ratio_per_image']:.1%} of generating one")
    axes = frontier_axes(result.scores)
    if axes is None:
        return
    summary = result.summary(*axes)
    print(_score_table(summary).to_string(index=False))
    print("Δ: mean paired difference against the baseline on the same prompt and seed, "
          "[95% t-interval]; an interval holding 0 does not differ from the baseline")
    for suggestion in suggestions(summary, *axes):
        print("suggested:", suggestion.sentence)
    _print_variance(result.scores)


def _score_table(summary):
    """Each metric's mean and its paired difference against the baseline, as text columns."""
    import pandas as pd

    from .frontier import metric_label
    from .stats import delta_text

    table = pd.DataFrame({"method": summary["method"], "weight": summary["weight"].map(lambda w: f"{w:g}")})
    for metric in [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]:
        table[metric_label(metric)] = summary[f"{metric}_mean"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
        table[f"Δ {metric_label(metric)}"] = [
            delta_text(row[f"{metric}_delta"], row[f"{metric}_delta_lo"], row[f"{metric}_delta_hi"],
                       row[f"{metric}_delta_n"])[2:] or "-" for _, row in summary.iterrows()]
    table["front"] = summary["on_pareto_front"].map({True: "*", False: ""})
    return table


def _print_variance(scores) -> None:
    from .frontier import metric_label
    from .stats import variance_shares

    shares = variance_shares(scores)
    if shares.empty:
        return
    print("variance of each metric over images, by source (main effects; residual = interactions):")
    for metric, rows in shares.groupby("metric", sort=False):
        parts = ", ".join(f"{source} {share:.1%}" for source, share in zip(rows["source"], rows["share"]))
        print(f"  {metric_label(metric)}: {parts} ({rows['n'].iloc[0]} values)")


def _score(args) -> int:
    from .run_folder import RunFolder
    from .runner import score_run

    run_dir = Path(args.run_dir)
    study = RunFolder(run_dir).study()  # an exported run's manifest names its references relative to the folder
    result = score_run(study, run_dir, scoring=_scoring(study, args))
    print(f"{study.name}: rescored {len(result.results)}/{len(study.cells())} cells -> {run_dir}")
    _print_scores(result)
    return 0


def _metrics(args) -> int:
    """Print every registered metric: how it is labelled, what it measures, which backbone it needs."""
    from .metrics import METRICS

    columns = ("name", "label", "level", "axis", "direction", "scale", "backbone")
    rows = [columns] + [(name, *(str(getattr(cls, c)) for c in columns[1:])) for name, cls in sorted(METRICS.items())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import StudyError
    from .models import OFFLOAD_MODES

    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="generate (and score) a study preset")
    run.add_argument("preset", help="presets/NAME.yaml")
    run.add_argument("--out", help="run folder (default runs/NAME)")
    run.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: 1 on CPU, from free memory on GPU)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    run.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                     help="model: keep models in CPU RAM, each moved to the GPU while it runs (smaller GPUs, a little slower)")
    run.add_argument("--max-cells", type=int, default=None, help="override the preset's max_cells")
    run.add_argument("--no-score", action="store_true", help="generate only; score later with `score`")
    score = commands.add_parser("score", help="(re)score an existing run folder without generating")
    score.add_argument("run_dir")
    for command in (run, score):
        command.add_argument("--metrics", help="comma-separated, default clip_i,clip_t,dino,diversity "
                                               "(`python -m workbench metrics` lists them)")
        command.add_argument("--clip", help="CLIP backbone for clip_i/clip_t: ViT-B-32 (default) or ViT-L-14")
    metrics = commands.add_parser("metrics", help="list the registered metrics (with --plugin: plugins' too)")
    for command in (run, score, metrics):
        command.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                             help="import MODULE first, to register its methods and metrics (repeatable; "
                                  "also $WORKBENCH_PLUGINS=mod1,mod2)")
    args = parser.parse_args(argv)
    try:
        from .plugins import load_plugins

        load_plugins(args.plugin)
        if args.command == "metrics":
            return _metrics(args)
        if args.command == "run":
            return _run(args)
        if args.command == "score":
            return _score(args)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are on disk; run the same command again to resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
