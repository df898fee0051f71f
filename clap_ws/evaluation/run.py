"""``clap-ws evaluate``: three classifiers and the field's retrieval figures on one labelled library.

:func:`evaluate` takes the library's stored embeddings (no audio is embedded
again) and a function that embeds texts (the library's own model, loaded or
reached over a server), and returns everything the report shows as one dict.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ClapError, ErrorCode
from ..search.library import Library
from ..similarity import unit
from .classify import chance_figures, classification, linear_scores, prototype_scores, zero_shot_scores
from .labels import Labelled, labelled, read_captions
from .metrics import caption_metrics, chance, ranking_metrics, summarise

DEFAULT_PROMPT = "This is a sound of {label}."  # LAION-CLAP's ESC-50 protocol
APPROACHES = ("zero-shot", "prototypes", "linear")


def prompt_for(label: str, template: str) -> str:
    """LAION's rule: underscores in a label become spaces (``chirping_birds`` -> "chirping birds")."""
    return template.format(label=label.replace("_", " "))


def evaluate(library: Library, embed_texts: Callable[[list[str]], np.ndarray], *, labels: str = "folder",
             prompt: str = DEFAULT_PROMPT, captions: str | Path | None = None, folds: int = 5, draws: int = 1000,
             chance_draws: int = 200, seed: int = 0, progress: bool = True) -> dict:
    """Every figure for ``library``; raises :class:`~clap_ws.errors.ClapError` for unusable labels or captions
    before any work (see :func:`check`)."""
    data, caption_rows = check(library, labels, prompt, captions)
    rng = np.random.default_rng(seed)
    steps = tqdm(total=5 + (caption_rows is not None), desc="evaluating", unit="step", disable=not progress)

    emb = unit(library.embeddings[data.items].astype(np.float64))
    y, names, n_classes = data.labels, data.names, len(data.names)
    prompts = [prompt_for(name, prompt) for name in names]
    text = unit(np.asarray(embed_texts(prompts), np.float64))
    steps.update()

    scores = {"zero-shot": zero_shot_scores(emb, text), "prototypes": prototype_scores(emb, y, n_classes),
              "linear": linear_scores(emb, y, n_classes, folds, seed)}
    steps.update()
    result: dict = {"classification": {}, "retrieval": {}}
    for name in APPROACHES:
        result["classification"][name] = classification(scores[name], y, names, rng, draws)
    result["classification_chance"] = chance(lambda s: chance_figures(s, y, n_classes, rng), (len(y), n_classes),
                                             rng, chance_draws)
    steps.update()

    relevant = y[None, :] == np.arange(n_classes)[:, None]
    result["retrieval"]["text_to_audio"] = _retrieval(text @ emb.T, relevant, rng, draws, chance_draws,
                                                      ("R@1", "R@5", "R@10", "mAP@10", "nDCG@10", "MRR"))
    steps.update()
    self_excluded = emb @ emb.T
    np.fill_diagonal(self_excluded, -np.inf)
    same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
    result["retrieval"]["audio_to_audio"] = _retrieval(self_excluded, same, rng, draws, chance_draws,
                                                       ("P@10", "mAP@10", "nDCG@10"), exclude_diagonal=True)
    steps.update()
    if caption_rows is not None:
        result["retrieval"].update(_captions(library, caption_rows, embed_texts, rng, draws, chance_draws))
        steps.update()
    steps.close()
    result["data"] = _describe(library, data, prompts, caption_rows, folds, draws, seed)
    return result


def check(library: Library, labels: str = "folder", prompt: str = DEFAULT_PROMPT,
          captions: str | Path | None = None) -> tuple[Labelled, tuple[list[int], list[str]] | None]:
    """The labelled items and the captions, or a :class:`~clap_ws.errors.ClapError` naming what makes them
    unusable: cheap, so the CLI runs it before loading a model."""
    if "{label}" not in prompt:
        raise ClapError(f"--prompt {prompt!r} has no {{label}} to fill in", code=ErrorCode.BAD_REQUEST)
    paths = [item["path"] for item in library.items]
    return labelled(paths, labels), (read_captions(captions, paths) if captions else None)


def _retrieval(scores: np.ndarray, relevant: np.ndarray, rng, draws: int, chance_draws: int, keep: tuple[str, ...],
               exclude_diagonal: bool = False) -> dict:
    def figures(s: np.ndarray) -> dict[str, np.ndarray]:
        if exclude_diagonal:
            s = s.copy()
            np.fill_diagonal(s, -np.inf)
        return {k: v for k, v in ranking_metrics(s, relevant, rng).items() if k in keep}

    shape = (scores.shape[0], scores.shape[1])
    return {"figures": summarise(figures(scores), rng, draws),
            "chance": chance(lambda s: {k: float(np.nanmean(v)) for k, v in figures(s).items()}, shape, rng,
                             chance_draws)}


def _captions(library: Library, rows: tuple[list[int], list[str]], embed_texts, rng, draws: int,
              chance_draws: int) -> dict:
    """Caption -> audio (each caption a query, its own clip relevant) and audio -> caption (LAION's rules),
    among the captioned clips."""
    items, captions = rows
    clips = sorted(set(items))
    position = {item: i for i, item in enumerate(clips)}
    owner = np.array([position[i] for i in items])
    audio = unit(library.embeddings[clips].astype(np.float64))
    text = unit(np.asarray(embed_texts(captions), np.float64))
    relevant = owner[:, None] == np.arange(len(clips))[None, :]
    keep = ("R@1", "R@5", "R@10", "mAP@10")
    to_audio = _retrieval(text @ audio.T, relevant, rng, draws, chance_draws, keep)
    to_caption = {"figures": summarise(caption_metrics(audio @ text.T, owner, rng), rng, draws),
                  "chance": chance(lambda s: {k: float(v.mean()) for k, v in caption_metrics(s, owner, rng).items()},
                                   (len(clips), len(captions)), rng, chance_draws)}
    return {"caption_to_audio": to_audio, "audio_to_caption": to_caption}


def _describe(library: Library, data: Labelled, prompts: list[str], captions, folds: int, draws: int,
              seed: int) -> dict:
    counts = np.bincount(data.labels, minlength=len(data.names))
    return {"library": library.name, "library_file": library.path, "model": library.model,
            "untrained": library.model.get("name") == "untrained", "items": int(len(data.items)),
            "library_items": len(library), "classes": data.names, "class_counts": counts.tolist(),
            "dropped_classes": data.dropped_classes, "unlabelled_items": data.unlabelled, "prompts": prompts,
            "captions": None if captions is None else {"rows": len(captions[0]), "clips": len(set(captions[0]))},
            "folds": folds, "bootstrap_draws": draws, "seed": seed}
