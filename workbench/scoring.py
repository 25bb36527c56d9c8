"""Deprecated name, kept for one release: the run's scores live in `workbench.run_scores`."""

from .run_scores import (DEFAULT_METRICS, SCORE_COLUMNS, SCORING_COST_FILE, RunScores,  # noqa: F401
                         ScoreTable, ScoringSpec, load_scorer)
