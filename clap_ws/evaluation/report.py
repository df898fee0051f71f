"""The evaluation's files: ``evaluation.json`` (everything), ``evaluation.md`` (read first) and PNG figures.

Files are written to temporary names and renamed into place, so a failed
run never leaves half a report beside an old one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .. import __version__

TITLES = {"zero-shot": "zero-shot (class prompts)", "prototypes": "prototypes (class means, leave-one-out)",
          "linear": "linear (logistic regression, k-fold)"}
TASKS = {"text_to_audio": "text → audio (each class prompt a query)",
         "audio_to_audio": "audio → audio (each item a query, itself excluded)",
         "caption_to_audio": "caption → audio", "audio_to_caption": "audio → caption"}


def _cell(figure: dict) -> str:
    low, high = figure.get("ci95", [np.nan, np.nan])
    return f"{figure['mean']:.3f} [{low:.3f}, {high:.3f}]"


def _chance(figure: dict) -> str:
    low, high = figure["range95"]
    return f"{figure['mean']:.3f} [{low:.3f}, {high:.3f}]"


def model_line(model: dict) -> str:
    sha = model.get("sha256")
    checkpoint = f"checkpoint sha256 {sha}" if sha else f"no checkpoint (seed {model.get('seed')})"
    return f"{model.get('name')} ({model.get('architecture')}, {checkpoint})"


def markdown(result: dict) -> str:
    data = result["data"]
    lines = [f"# Evaluation of library `{data['library']}`", ""]
    if data["untrained"]:
        lines += ["> **The model is untrained: random weights, not CLAP.** These figures are a random-encoder "
                  "baseline for comparison; they say nothing about how well CLAP finds these sounds.", ""]
    dropped = ", ".join(f"{k} ({v})" for k, v in sorted(data["dropped_classes"].items())) or "none"
    lines += [f"- Model: {model_line(data['model'])}",
              f"- Library: `{data['library_file'] or data['library']}`: {data['items']} items in "
              f"{len(data['classes'])} classes evaluated, of {data['library_items']} in the library "
              f"({data['unlabelled_items']} without a label; classes with fewer than 2 items left out: {dropped})",
              f"- Prompt: \"{data['prompts'][0]}\" ...; linear model: {data['folds']}-fold stratified "
              f"cross-validation; 95 % intervals: bootstrap over queries ({data['bootstrap_draws']} draws); "
              f"chance: the same figures for random scores (mean and 95 % range); seed {data['seed']}",
              f"- clap-ws {__version__}, {time.strftime('%Y-%m-%d')}", "",
              "## Classification", "",
              "| approach | top-1 | top-5 | mAP@10 | macro precision | macro recall | macro F1 |",
              "|---|---|---|---|---|---|---|"]
    for name, block in result["classification"].items():
        f = block["figures"]
        lines.append(f"| {TITLES[name]} | " + " | ".join(_cell(f[k]) for k in
                     ("top1", "top5", "mAP@10", "macro_precision", "macro_recall", "macro_f1")) + " |")
    c = result["classification_chance"]
    lines.append(f"| chance (random scores) | {_chance(c['top1'])} | {_chance(c['top5'])} | {_chance(c['mAP@10'])} "
                 f"| | | {_chance(c['macro_f1'])} |")
    lines += ["", "## Retrieval", ""]
    for task, block in result["retrieval"].items():
        names = list(block["figures"])
        lines += [f"**{TASKS[task]}** ({next(iter(block['figures'].values()))['queries']} queries)", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
                  "| model | " + " | ".join(_cell(block["figures"][n]) for n in names) + " |",
                  "| chance | " + " | ".join(_chance(block["chance"][n]) for n in names) + " |", ""]
    lines += ["## Per class", "", "| class | items | " + " | ".join(f"{a} F1" for a in result["classification"])
              + " |", "|---|---|" + "---|" * len(result["classification"])]
    for i, name in enumerate(data["classes"]):
        f1s = [f"{block['per_class'][name]['f1']:.3f}" for block in result["classification"].values()]
        lines.append(f"| {name} | {data['class_counts'][i]} | " + " | ".join(f1s) + " |")
    lines += ["", "Figures: " + ", ".join(f"`confusion-{a}.png`" for a in result["classification"])
              + ", `retrieval.png`.", "",
              "Rules: in the classification table, top-1 and mAP@10 (1/rank of the true class within 10) are "
              "LAION-CLAP's zero-shot R@1 and mAP@10; ties are broken at random (seeded); R@k says whether a "
              "relevant item is in the top k; mAP@10 sums precision at each relevant hit in the top 10 over "
              "min(10, relevant); nDCG@10 has binary gains; MRR is over the whole ranking; audio → caption "
              "follows LAION-CLAP's multi-caption rules (docs/search.md)."]
    return "\n".join(lines) + "\n"


def confusion_figure(matrix: list[list[float]], classes: list[str], title: str):
    """A row-normalised confusion matrix with the class names on both axes (readable up to ~50 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    side = max(5.0, 0.3 * n + 3)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(np.asarray(matrix), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=9 if n <= 25 else 7)
    ax.set_yticks(range(n), classes, fontsize=9 if n <= 25 else 7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                value = matrix[i][j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return fig


def retrieval_figure(result: dict, title: str):
    """Each retrieval task's figures with their intervals, and the chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["retrieval"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, (task, block) in zip(axes[0], tasks):
        names = list(block["figures"])
        means = [block["figures"][n]["mean"] for n in names]
        errors = np.array([[m - block["figures"][n]["ci95"][0], block["figures"][n]["ci95"][1] - m]
                           for n, m in zip(names, means)]).T
        ax.bar(names, means, yerr=errors, color="#2b6cb0", capsize=3)
        ax.scatter(names, [block["chance"][n]["mean"] for n in names], color="#c05621", marker="_", s=400,
                   label="chance", zorder=3)
        ax.set_ylim(0, 1)
        ax.set_title(TASKS[task], fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write(result: dict, out: str | os.PathLike) -> list[Path]:
    """Write every file of the report into ``out`` (created if needed); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = result["data"]
    label = "UNTRAINED model" if data["untrained"] else data["model"].get("name")
    files: dict[str, bytes] = {
        "evaluation.json": json.dumps(result, indent=1, default=float).encode(),
        "evaluation.md": markdown(result).encode(),
    }
    for name, block in result["classification"].items():
        fig = confusion_figure(block["confusion"], data["classes"], f"{TITLES[name]} · {label} · {data['library']}")
        files[f"confusion-{name}.png"] = _png(fig, data["classes"])
    files["retrieval.png"] = _png(retrieval_figure(result, f"retrieval · {label} · {data['library']}"), [])
    written = []
    for name, payload in files.items():
        target = out / name
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, target)
        written.append(target)
    return written


def _png(fig, classes: list[str]) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Description": "classes: " + ", ".join(classes)})
    plt.close(fig)
    return buffer.getvalue()
