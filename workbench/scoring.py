"""Scoring a run: embed each image once (cached in the run folder by cell key), derive every metric.

The runner calls `RunScores.add` after each batch, so scores arrive as cells finish; rescoring a
run (`python -m workbench score RUN_DIR`) embeds only images it has not embedded before.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from .files import atomic_write
from .images import load_image
from .spec import Cell

DEFAULT_METRICS = ("clip_i", "clip_t", "dino", "diversity")
SCORING_COST_FILE = "scoring_cost.json"  # in RUN_DIR/scores: images embedded and seconds of the last scoring
SCORE_COLUMNS = ["prompt_index", "prompt", "method", "kind", "weight", "seed", "key", "metric", "value"]


@dataclass(frozen=True)
class ScoringSpec:
    """Which metrics, on which backbones. `tiny` backbones serve tiny bases (offline tests)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    clip: tuple[str, str] = ("ViT-B-32", "openai")
    dino: str = "facebook/dino-vits16"

    @classmethod
    def for_study(cls, study, metrics=None, clip: str | None = None) -> "ScoringSpec":
        metrics = tuple(metrics or DEFAULT_METRICS)
        if study.is_tiny:
            if clip not in (None, "ViT-B-32"):
                from .errors import StudyError

                raise StudyError(f"clip: a tiny study scores with tiny random CLIP and DINO models; {clip} applies "
                                 "only to real bases")
            return cls(metrics, ("ViT-B-32", "tiny"), "tiny")
        clip_model = clip or "ViT-B-32"
        return cls(metrics, (clip_model, "openai"), "facebook/dino-vits16")


def load_scorer(spec: ScoringSpec, device: str | None = None):
    """A Scorer with its backbones loaded once (kept while the app or process lives, and while local
    backbone weights keep their content)."""
    from .metrics.backbones import local_weights_identity

    local = (local_weights_identity("clip", *spec.clip), local_weights_identity("dino", spec.dino))
    return _load_scorer(spec, device, local)


@lru_cache(maxsize=2)
def _load_scorer(spec: ScoringSpec, device: str | None, local_weights: tuple):
    from .errors import StudyError
    from .metrics.scorer import Scorer

    try:
        return Scorer(spec.metrics, clip=spec.clip, dino=spec.dino, device=device)
    except ValueError as error:
        raise StudyError(f"metrics: {error}") from None
    except (OSError, RuntimeError) as error:
        raise StudyError(
            f"metrics: cannot load the scoring backbones {spec.clip[0]}/{spec.clip[1]} and {spec.dino} "
            f"({str(error).splitlines()[0]}). On a machine with network, run the study once to cache them, "
            "or pass --no-score") from None


load_scorer.cache_clear = _load_scorer.cache_clear


class RunScores:
    """Embeddings and scores of the images of one run folder."""

    def __init__(self, scorer, study, run_dir: Path):
        self.scorer, self.study, self.run_dir = scorer, study, Path(run_dir)
        # Named by the backbones' weights, not their names: new weights at the same path get a new cache.
        made_by = {"provenance": scorer.provenance(), "weights": scorer.identity()}
        fingerprint = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:12]
        self.cache_path = self.run_dir / "scores" / f"embeddings-{fingerprint}.safetensors"
        self.embeddings: dict[str, dict[str, torch.Tensor]] = self._load_cache()
        references = [load_image(p, "subject.reference_images") for p in study.subject.reference_images]
        self.references = scorer.embed_references(references)
        self.records: dict[Cell, dict] = {}  # one row per cell: twins share an image (and its embedding), not a row
        self.seconds = 0.0  # time spent embedding generated images (backbone loading and references excluded)
        self.images_embedded = 0  # images embedded by this object (embedding-cache hits are not counted)

    def _load_cache(self) -> dict[str, dict[str, torch.Tensor]]:
        if not self.cache_path.exists():
            return {}
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.cache_path))
        except (SafetensorError, OSError) as error:  # a damaged cache only costs embedding again
            warnings.warn(f"{self.cache_path} is damaged ({error}); embedding the images again")
            return {}
        cached: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            key, kind = name.split("/", 1)
            cached.setdefault(key, {})[kind] = tensor
        return cached

    def save(self) -> None:
        from safetensors.torch import save_file

        flat = {f"{key}/{kind}": tensor.contiguous().cpu() for key, kinds in self.embeddings.items()
                for kind, tensor in kinds.items()}
        atomic_write(self.cache_path, lambda partial: save_file(flat, str(partial)))
        # What this session's scoring cost, for the manifest (the run result carries only the seconds).
        cost = {"images_embedded": self.images_embedded, "seconds": round(self.seconds, 4)}
        atomic_write(self.cache_path.parent / SCORING_COST_FILE, json.dumps(cost))

    def add(self, results, images: list[Image.Image] | None = None) -> None:
        """Embed the images of `results` not embedded yet, in one batch per backbone."""
        start = time.perf_counter()
        for result in results:
            self.records[result.cell] = {
                "prompt_index": result.cell.prompt_index, "prompt": self.study.scoring_prompt(result.cell.template),
                "method": result.method, "kind": result.kind, "weight": result.cell.weight, "seed": result.cell.seed,
                "key": result.key,
            }
        todo = list({r.key: (i, r) for i, r in enumerate(results) if r.key not in self.embeddings}.values())
        if todo:
            pictures = [images[i] if images is not None else Image.open(r.image_path).convert("RGB") for i, r in todo]
            prompts = [self.records[r.cell]["prompt"] for _, r in todo]
            embedded = self.scorer.embed_images(pictures, prompts)
            for row, (_, result) in enumerate(todo):
                self.embeddings[result.key] = {kind: rows[row].cpu() for kind, rows in embedded.items()}
            self.images_embedded += len(todo)
        self.seconds += time.perf_counter() - start

    def frame(self) -> pd.DataFrame:
        """The long score table of every added image, plus one row per group for group metrics."""
        if not self.records:
            return pd.DataFrame(columns=SCORE_COLUMNS)
        keys = [record["key"] for record in self.records.values()]
        cells = pd.DataFrame(list(self.records.values()))
        stacked = {kind: torch.stack([self.embeddings[k][kind] for k in keys])
                   for kind in self.embeddings[keys[0]]}
        frames = [cells.assign(metric=name, value=values.numpy())
                  for name, values in self.scorer.score_embedded(stacked, self.references).items()]
        group_rows = []
        for metric in self.scorer.group_metrics:
            for (prompt_index, method, weight), group in cells.groupby(["prompt_index", "method", "weight"], sort=False, dropna=False):
                subset = {kind: rows[group.index.to_list()] for kind, rows in stacked.items()}
                group_rows.append({"prompt_index": prompt_index, "prompt": group["prompt"].iloc[0], "method": method,
                                   "kind": group["kind"].iloc[0], "weight": weight, "seed": None, "key": None,
                                   "metric": metric.name,
                                   "value": metric.score_group(subset)})
        if group_rows:
            frames.append(pd.DataFrame(group_rows))
        return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]
