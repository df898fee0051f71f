"""``clap-ws evaluate``: every metric by hand and against scikit-learn, planted structure, real files end to end,
and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import chirp, noise, tone
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix, ndcg_score

from clap_ws.errors import ClapError
from clap_ws.evaluation import evaluate, write
from clap_ws.evaluation.classify import classification, prototype_scores
from clap_ws.evaluation.labels import labelled, read_captions
from clap_ws.evaluation.metrics import caption_metrics, chance, ranking_metrics
from clap_ws.evaluation.report import confusion_figure
from clap_ws.search.index import VectorIndex
from clap_ws.search.library import Library
from clap_ws.similarity import unit

RNG = np.random.default_rng


# ---- metrics by hand -----------------------------------------------------------------------------
def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([[0.9, 0.8, 0.7, 0.6]]), np.array([[False, True, False, True]]), RNG(0))
    assert m["R@1"][0] == 0 and m["R@5"][0] == 1 and m["P@10"][0] == pytest.approx(0.2)
    assert m["mAP@10"][0] == pytest.approx((1 / 2 + 2 / 4) / 2)
    dcg, ideal = 1 / np.log2(3) + 1 / np.log2(5), 1 + 1 / np.log2(3)
    assert m["nDCG@10"][0] == pytest.approx(dcg / ideal) and m["MRR"][0] == pytest.approx(0.5)


def test_ties_empty_queries_and_excluded_items():
    both = ranking_metrics(np.array([[0.5, 0.5, 0.1]]), np.array([[True, True, False]]), RNG(0))
    assert both["mAP@10"][0] == 1 and both["MRR"][0] == 1 and both["R@1"][0] == 1  # a tie among relevant items
    # a tie between a relevant and an irrelevant item: broken at random, so 0.75 on average, not 1 or 0.5
    rng = RNG(1)
    mrr = [ranking_metrics(np.array([[0.5, 0.5]]), np.array([[True, False]]), rng)["MRR"][0] for _ in range(2000)]
    assert np.mean(mrr) == pytest.approx(0.75, abs=0.03)
    empty = ranking_metrics(np.array([[0.3, 0.2]]), np.array([[False, False]]), RNG(0))
    assert all(np.isnan(v[0]) for v in empty.values())
    excluded = ranking_metrics(np.array([[-np.inf, 0.2, 0.1]]), np.array([[True, False, True]]), RNG(0))
    assert excluded["MRR"][0] == pytest.approx(0.5) and excluded["mAP@10"][0] == pytest.approx(0.5)


def test_ranking_metrics_match_scikit_learn():
    rng = RNG(3)
    scores = rng.standard_normal((30, 40))  # no ties
    relevant = rng.random((30, 40)) < 0.2
    relevant[:, 0] = True
    ours = ranking_metrics(scores, relevant, rng, k=10)
    assert np.mean(ours["nDCG@10"]) == pytest.approx(ndcg_score(relevant, scores, k=10), abs=1e-9)
    full = ranking_metrics(scores, relevant, rng, k=40)  # AP over the whole ranking
    expected = [average_precision_score(r, s) for r, s in zip(relevant, scores)]
    np.testing.assert_allclose(full["mAP@40"], expected, atol=1e-9)


def test_caption_metrics_follow_laion_rules():
    owner = np.array([0, 0, 1, 1])  # two captions per clip
    scores = np.array([[0.7, 0.1, 0.9, 0.2],  # clip 0: its captions rank 2nd and 4th
                       [0.1, 0.2, 0.9, 0.8]])  # clip 1: 1st and 2nd
    m = caption_metrics(scores, owner, RNG(0))
    assert list(m["R@1"]) == [0, 1] and list(m["R@5"]) == [1, 1]
    assert m["mAP@10"][0] == pytest.approx((1 / 2 + 2 / 4) / 2) and m["mAP@10"][1] == pytest.approx(1.0)


def test_classification_confusion_and_an_empty_predicted_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores = np.zeros((6, 3))
    scores[[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]] = 1  # class 2 is never predicted
    result = classification(scores, labels, ["a", "b", "c"], RNG(0), draws=50)
    predicted = np.array([0, 0, 0, 1, 0, 1])
    np.testing.assert_allclose(result["confusion"], confusion_matrix(labels, predicted, normalize="true"))
    assert result["figures"]["top1"]["mean"] == pytest.approx(3 / 6)
    assert result["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert result["per_class"]["a"]["precision"] == pytest.approx(2 / 4)
    assert result["figures"]["macro_recall"]["mean"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_prototypes_leave_the_item_out():
    e = unit(np.array([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]]))
    scores = prototype_scores(e, np.array([0, 0, 1, 1]), 2)
    assert scores[0, 0] == pytest.approx(float(e[0] @ e[1]))  # its class mean without it is item 1 alone
    assert scores[0, 1] == pytest.approx(float(e[0] @ unit(e[2] + e[3])))


def test_chance_is_the_metric_under_random_scores():
    labels = np.repeat(np.arange(4), 5)
    relevant = labels[None, :] == np.arange(4)[:, None]
    c = chance(lambda s: {"R@1": float(np.mean(ranking_metrics(s, relevant, RNG(0))["R@1"]))}, (4, 20), RNG(2), 400)
    assert c["R@1"]["mean"] == pytest.approx(5 / 20, abs=0.03)  # a relevant item first: 5 of 20


# ---- planted structure ---------------------------------------------------------------------------------
def planted(classes: int = 6, per_class: int = 20, spread: float = 0.08, shuffle: bool = False, seed: int = 0):
    rng = RNG(seed)
    centres = unit(rng.standard_normal((classes, 512)))
    labels = np.repeat(np.arange(classes), per_class)
    vectors = unit(centres[labels] + spread * rng.standard_normal((len(labels), 512))).astype(np.float32)
    names = [f"class_{c}" for c in range(classes)]
    shown = rng.permutation(labels) if shuffle else labels
    items = [{"path": f"{names[c]}/s{i:03d}.wav", "duration": 1.0} for i, c in enumerate(shown)]
    library = Library("planted", {"name": "planted", "architecture": "test"}, items, VectorIndex(vectors, "flat"))
    prompts = {f"This is a sound of class {c}.": centres[c] for c in range(classes)}
    return library, (lambda texts: np.stack([prompts[t] for t in texts]))


def test_planted_classes_are_found_and_shuffled_labels_are_at_chance():
    library, texts = planted()
    result = evaluate(library, texts, draws=200, chance_draws=100, progress=False)
    for name in ("zero-shot", "prototypes", "linear"):
        assert result["classification"][name]["figures"]["top1"]["mean"] > 0.97, name
    assert result["retrieval"]["text_to_audio"]["figures"]["mAP@10"]["mean"] > 0.97
    assert result["retrieval"]["audio_to_audio"]["figures"]["mAP@10"]["mean"] > 0.97
    shuffled, texts = planted(shuffle=True)
    result = evaluate(shuffled, texts, draws=200, chance_draws=200, progress=False)
    low, high = result["classification_chance"]["top1"]["range95"]
    for name in ("zero-shot", "prototypes", "linear"):
        assert low <= result["classification"][name]["figures"]["top1"]["mean"] <= high, name
    for task in ("text_to_audio", "audio_to_audio"):
        block = result["retrieval"][task]
        low, high = block["chance"]["mAP@10"]["range95"]
        assert low <= block["figures"]["mAP@10"]["mean"] <= high, task


def test_report_names_the_model_and_classes_and_writes_every_file(tmp_path):
    library, texts = planted(classes=3, per_class=4)
    result = evaluate(library, texts, draws=50, chance_draws=20, progress=False)
    files = {p.name for p in write(result, tmp_path)}
    assert files == {"evaluation.json", "evaluation.md", "confusion-zero-shot.png", "confusion-prototypes.png",
                     "confusion-linear.png", "retrieval.png"}
    report = (tmp_path / "evaluation.md").read_text()
    assert "| approach | top-1 |" in report.split("## Retrieval")[0] and "12 items in 3 classes" in report
    assert "untrained" not in report.lower()
    fig = confusion_figure(result["classification"]["linear"]["confusion"], result["data"]["classes"], "t")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["class_0", "class_1", "class_2"]
    image = Image.open(tmp_path / "confusion-linear.png")
    assert image.size[0] > 300 and "class_2" in image.info["Description"]


# ---- labels, captions and bad input ---------------------------------------------------------------------
def test_labels_from_folders_and_regex_and_what_is_left_out():
    paths = ["dog/a.wav", "dog/b.wav", "cat/c.wav", "cat/d.wav", "owl/e.wav", "f.wav"]
    data = labelled(paths)
    assert data.names == ["cat", "dog"] and data.dropped_classes == {"owl": 1} and data.unlabelled == 1
    assert list(data.items) == [0, 1, 2, 3]
    esc = ["1-100-A-0.wav", "1-101-A-0.wav", "2-102-A-41.wav", "3-103-B-41.wav"]
    by_regex = labelled(esc, r"-(?P<label>\d+)\.wav$")
    assert by_regex.names == ["0", "41"]


@pytest.mark.parametrize("paths, rule, words", [
    (["a.wav", "b.wav"], "folder", "not in folders"),
    (["dog/a.wav", "dog/b.wav", "cat/c.wav"], "folder", "at least 2 classes"),
    (["dog/a.wav", "cat/b.wav"], r"zebra(\d)", "matched no path"),
    (["dog/a.wav"], "(", "not a regular expression"),
])
def test_unusable_labels_say_why(paths, rule, words):
    with pytest.raises(ClapError, match=words):
        labelled(paths, rule)


def test_captions_csv(tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text('path,caption\na/x.wav,"a dog barks, twice"\na/x.wav,a dog\nb/y.wav,rain on a roof\n')
    items, captions = read_captions(csv, ["a/x.wav", "b/y.wav"])
    assert items == [0, 0, 1] and captions[0] == "a dog barks, twice"
    csv.write_text("a/x.wav,a dog\nmissing.wav,nothing\n")
    with pytest.raises(ClapError, match="not in the library.*missing.wav"):
        read_captions(csv, ["a/x.wav", "b/y.wav"])


# ---- end to end, real files ---------------------------------------------------------------------------
def write_kinds(root, per_class: int = 4):
    """Sounds of different kinds in labelled folders: tones, noise, chirps, clicks."""
    sr = 16000
    kinds = {
        "tone": lambda i: tone(220 * (i + 1), sr=sr, seconds=1),
        "noise": lambda i: noise(sr=sr, seconds=1, seed=i),
        "chirp": lambda i: chirp(100 + 50 * i, 4000, sr=sr, seconds=1),
        "click_train": lambda i: (np.arange(sr) % (800 + 100 * i) < 20).astype("f4") * 0.8,
    }
    for name, make in kinds.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            sf.write(root / name / f"{name}{i}.wav", make(i), sr)
    (root / "lonely").mkdir()
    sf.write(root / "lonely" / "one.wav", tone(sr=sr, seconds=0.5), sr)
    return list(kinds)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "clap_ws", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_build_then_evaluate_real_files_end_to_end(tmp_path):
    kinds = write_kinds(tmp_path / "sounds")
    lib = tmp_path / "sounds.npz"
    built = cli("library", "build", str(tmp_path / "sounds"), "--out", str(lib), "--untrained", "--no-progress")
    assert built.returncode == 0, built.stderr
    assert '"untrained" model: random weights' in built.stderr  # said at build time
    captions = tmp_path / "captions.csv"
    captions.write_text("".join(f"{k}/{k}{i}.wav,a {k.replace('_', ' ')} sound\n{k}/{k}{i}.wav,{k} number {i}\n"
                                for k in kinds for i in range(4)))
    out = tmp_path / "report"
    done = cli("evaluate", str(lib), "--untrained", "--out", str(out), "--captions", str(captions),
               "--bootstrap", "200")
    assert done.returncode == 0, done.stderr
    assert "untrained" in done.stderr and "evaluating" in done.stderr  # the warning and the progress bar
    result = json.loads((out / "evaluation.json").read_text())
    assert result["data"]["classes"] == sorted(kinds) and result["data"]["dropped_classes"] == {"lonely": 1}
    assert set(result["retrieval"]) == {"text_to_audio", "audio_to_audio", "caption_to_audio", "audio_to_caption"}
    assert result["data"]["prompts"][0] == "This is a sound of chirp."
    report = (out / "evaluation.md").read_text()
    assert "The model is untrained" in report and "16 items in 4 classes" in report
    for name in ("zero-shot", "prototypes", "linear"):
        assert "click_train" in Image.open(out / f"confusion-{name}.png").info["Description"]


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path):
    flat = Library("flat", {"name": "untrained"}, [{"path": "a.wav"}, {"path": "b.wav"}],
                   VectorIndex(unit(RNG(0).standard_normal((2, 512))).astype(np.float32), "flat"))
    flat.save(tmp_path / "flat.npz")
    library, _ = planted(classes=2, per_class=3)
    library.save(tmp_path / "planted.npz")
    (tmp_path / "captions.csv").write_text("class_0/s000.wav,fine\nnot/there.wav,unknown\n")
    cases = [
        (["flat.npz"], "not in folders"),
        (["planted.npz", "--labels", r"nothing(\d)"], "matched no path"),
        (["planted.npz", "--labels", r"class_(0)"], "at least 2 classes"),
        (["planted.npz", "--captions", "captions.csv"], "not/there.wav"),
        (["planted.npz", "--prompt", "a sound"], "{label}"),
    ]
    for args, words in cases:
        out = tmp_path / "out"
        result = cli("evaluate", *[str(tmp_path / a) if a.endswith((".npz", ".csv")) else a for a in args],
                     "--untrained", "--out", str(out), timeout=120)
        assert result.returncode != 0 and words in result.stderr, (args, result.stderr)
        assert not out.exists(), args


def test_laion_zero_shot_map_at_10_is_the_reciprocal_rank_of_the_true_class():
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]])  # true class ranks 1, 3 and 2
    result = classification(scores, np.array([0, 2, 1]), ["a", "b", "c"], RNG(0), draws=50)
    assert result["figures"]["mAP@10"]["mean"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert result["figures"]["top1"]["mean"] == pytest.approx(1 / 3)


async def test_prompts_from_a_running_server_must_come_from_the_librarys_model(model):
    import asyncio

    from helpers import running_server

    from clap_ws.errors import ModelError
    from clap_ws.evaluation.remote import ServerTexts
    from clap_ws.model.clap import model_identity

    async with running_server(model, warm_up=False) as server:
        url = f"ws://127.0.0.1:{server.port}"
        texts = await asyncio.to_thread(ServerTexts, url, model_identity(model))
        remote = await asyncio.to_thread(texts, ["a dog", "rain"])
        np.testing.assert_allclose(remote, model.embed_text(["a dog", "rain"]), atol=1e-6)
        other = {**model_identity(model), "seed": 7}
        with pytest.raises(ModelError, match="cannot be compared"):
            await asyncio.to_thread(ServerTexts, url, other)
