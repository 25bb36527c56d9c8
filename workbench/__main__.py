"""Command line: `python -m workbench run presets/NAME.yaml --out runs/NAME`."""

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
    result = run_study(study, out, batch_size=args.batch_size, device=args.device)
    cached = len(result.results) - result.generated
    print(f"{study.name}: {result.generated} generated, {cached} cached, "
          f"{len(result.results)}/{len(study.cells())} cells in {result.wall_seconds:.1f} s -> {out}")
    if result.stopped:
        print("stopped: run the same command again to generate the missing cells", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import StudyError

    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="generate (and score) a study preset")
    run.add_argument("preset", help="presets/NAME.yaml")
    run.add_argument("--out", help="run folder (default runs/NAME)")
    run.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: 1 on CPU, from free memory on GPU)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    run.add_argument("--max-cells", type=int, default=None, help="override the preset's max_cells")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are on disk; run the same command again to resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
