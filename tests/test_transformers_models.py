"""Hugging Face transformers CLAP folders: clap-ws's embeddings against transformers' own, on folders written here.

Each model is ``transformers.ClapModel(ClapConfig(...))`` with random weights (and batch-norm statistics
that are not the identity), saved with ``save_pretrained`` beside a tokenizer and a feature extractor, as
the Hub's folders are. References are transformers' ``get_audio_features`` / ``get_text_features`` through
``ClapProcessor``, and its zero-shot pipeline. fp32 throughout; the bound is the issue's cosine >= 0.9999
(measured: >= 0.9999997; transformers computes the log-mel in float64, clap-ws in float32).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soxr
import torch
from helpers import Served, ask, b64, chirp, connect, noise, offline_env, running_server, tone, write_laion_checkpoint

from clap_ws.audio import windows
from clap_ws.cli import main
from clap_ws.errors import ModelError
from clap_ws.extractor import CLAPExtractor
from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import Architecture, read_checkpoint
from clap_ws.model.tokenizer import byte_level_tokenizer
from clap_ws.model.transformers_folder import TransformersFolder, to_laion, to_transformers

pytestmark = pytest.mark.slow
COSINE = 0.9999
KINDS = {
    "tiny": dict(enable_fusion=False),
    "tiny-fused": dict(enable_fusion=True),
    "base": dict(enable_fusion=False, depths=[2, 2, 12, 2], hidden_size=1024, patch_embeds_hidden_size=128),
}


def save_folder(hf, folder: Path, truncation: str, processor_file: bool = False) -> Path:
    """``hf`` saved as the Hub's folders are: weights and config, tokenizer, feature-extractor settings."""
    from transformers import ClapFeatureExtractor, ClapProcessor

    hf.save_pretrained(folder)
    extractor = ClapFeatureExtractor(truncation=truncation, frequency_min=50, frequency_max=14000)
    ClapProcessor(feature_extractor=extractor, tokenizer=byte_level_tokenizer()).save_pretrained(folder)
    if not processor_file:  # the Hub's layout: preprocessor_config.json (transformers 5 writes processor_config.json)
        settings = json.loads((folder / "processor_config.json").read_text())["feature_extractor"]
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))
        (folder / "processor_config.json").unlink()
    return folder


def random_transformers_model(audio: dict, seed: int = 0):
    from transformers import ClapConfig
    from transformers import ClapModel as TransformersClap

    torch.manual_seed(seed)
    hf = TransformersClap(ClapConfig(audio_config=audio)).eval()
    with torch.no_grad():  # batch norm that does something
        for name, buffer in hf.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buffer.normal_()
    return hf


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    out = {}
    for kind, audio in KINDS.items():
        hf = random_transformers_model(audio, seed=len(out))
        truncation = "fusion" if audio["enable_fusion"] else "rand_trunc"
        out[kind] = (hf, save_folder(hf, root / kind, truncation, processor_file=kind == "base"))
    return out


def processor(folder: Path):
    from transformers import ClapProcessor

    return ClapProcessor.from_pretrained(str(folder))


def transformers_audio(hf, folder: Path, clips: list[np.ndarray]) -> np.ndarray:
    """transformers' unit audio embeddings of 48 kHz clips; no clip marked longer (clap-ws's rule for <= 10 s;
    transformers' feature extractor marks one at random)."""
    inputs = processor(folder)(audio=clips, sampling_rate=48_000, return_tensors="pt")
    with torch.no_grad():
        out = hf.get_audio_features(input_features=inputs["input_features"].float(),
                                    is_longer=torch.zeros_like(inputs["is_longer"]))
    out = getattr(out, "pooler_output", out)
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def transformers_text(hf, folder: Path, texts: list[str]) -> np.ndarray:
    inputs = processor(folder)(text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    out = getattr(out, "pooler_output", out)
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def clips(sr: int) -> list[np.ndarray]:
    return [tone(440, sr, 1.0), chirp(200, 9000, sr, 3.3), noise(sr, 6.0, seed=3), tone(1000, sr, 10.0, amp=0.9)]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_audio_and_text_match_transformers(folders, kind):
    hf, folder = folders[kind]
    model = ClapModel.from_checkpoint(folder, precision="fp32")
    assert model.architecture.fusion == KINDS[kind]["enable_fusion"]
    assert model.architecture.audio == ("HTSAT-base" if kind == "base" else "HTSAT-tiny")
    assert model.identity.name == kind and len(model.identity.sha256) == 64
    assert not model.preprocessing.int16
    ours = unit_rows(np.concatenate([model.embed_windows(windows(clip)) for clip in clips(48_000)]))
    theirs = transformers_audio(hf, folder, clips(48_000))
    assert (ours * theirs).sum(axis=1).min() >= COSINE
    texts = ["a dog barking", "a warm bell with a long decay", "rain on a tin roof at night"]
    assert (model.embed_text(texts) * transformers_text(hf, folder, texts)).sum(axis=1).min() >= COSINE


def test_44k_audio_matches_transformers_given_the_same_resampled_audio(folders):
    hf, folder = folders["tiny"]
    extractor = CLAPExtractor(folder, precision="fp32")
    ours = extractor.extract_batch(clips(44_100), sample_rate=44_100)
    resampled = [soxr.resample(clip, 44_100, 48_000, quality="HQ") for clip in clips(44_100)]
    assert (ours * transformers_audio(hf, folder, resampled)).sum(axis=1).min() >= COSINE


def test_without_the_int16_step_more_than_with_it(folders):
    """The int16 round trip is laion-clap's, not transformers': with it, a fused model's tone drifts measurably."""
    hf, folder = folders["tiny-fused"]
    model = ClapModel.from_checkpoint(folder, precision="fp32")
    quiet = [tone(440, 48_000, 2.0, amp=0.01)]
    theirs = transformers_audio(hf, folder, quiet)
    with_step = model.variant(preprocessing=dataclasses.replace(model.preprocessing, int16=True))
    assert with_step.preprocessing.int16
    plain = unit_rows(model.embed_windows(windows(quiet[0])))
    assert (plain * theirs).sum() > (unit_rows(with_step.embed_windows(windows(quiet[0]))) * theirs).sum()


async def test_zero_shot_probs_match_the_pipeline(folders):
    from transformers import pipeline

    hf, folder = folders["tiny"]
    model = ClapModel.from_checkpoint(folder, precision="fp32")
    proc = processor(folder)
    classify = pipeline("zero-shot-audio-classification", model=hf, feature_extractor=proc.feature_extractor,
                        tokenizer=proc.tokenizer, device="cpu")
    prompts = ["a bell", "a dog barking", "white noise", "a chirping bird"]
    sound = chirp(300, 6000, 48_000, 2.0)
    theirs = {r["label"]: r["score"] for r in classify(sound, candidate_labels=prompts, hypothesis_template="{}")}
    async with running_server(model) as srv, connect(srv) as ws:
        reply = await ask(ws, {"audio_buffer": b64(sound), "prompts": prompts, "probs": True})
    assert reply["model"] == "tiny"
    assert set(reply["probs"]) == set(prompts)
    for prompt in prompts:
        assert reply["probs"][prompt] == pytest.approx(theirs[prompt], abs=1e-4)


def test_laion_checkpoint_to_a_transformers_folder_and_back(tmp_path, tiny_checkpoint):
    """The conversion is lossless both ways: a .pt exported as a folder that transformers loads strictly, read
    back into a .pt, embeds exactly as the original."""
    from transformers import ClapConfig
    from transformers import ClapModel as TransformersClap

    original = read_checkpoint(tiny_checkpoint)
    hf = TransformersClap(ClapConfig()).eval()
    exported = to_transformers(original)
    result = hf.load_state_dict(exported, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"text_model.embeddings.position_ids",
                                                                       "text_model.embeddings.token_type_ids"}
    folder = save_folder(hf, tmp_path / "exported", "rand_trunc")
    back = TransformersFolder.read(folder).state_dict({})
    assert all(torch.equal(back[k], original[k]) for k in back)
    net = ClapModel.untrained(Architecture(), seed=5, precision="fp32").net  # other weights, same architecture
    net.load_state_dict({**net.state_dict(), **back})
    roundtrip = write_laion_checkpoint(net, tmp_path / "roundtrip.pt")
    a, b = (ClapModel.from_checkpoint(p, precision="fp32") for p in (tiny_checkpoint, roundtrip))
    sound = windows(chirp(seconds=4.0))
    np.testing.assert_array_equal(a.embed_windows(sound), b.embed_windows(sound))
    assert to_laion(to_transformers(original)).keys() <= original.keys()


# ---- the Hugging Face cache, offline -------------------------------------------------
def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """``folder`` laid out as huggingface_hub lays a download out: blobs by hash, a snapshot of links, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def test_model_from_the_hugging_face_cache_offline(folders, tmp_path):
    hf, folder = folders["tiny"]
    cache = hub_cache(tmp_path / "hub", "someorg/clap-tiny-test", folder)
    env = offline_env(tmp_path, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"))
    served = Served([sys.executable, "-m", "clap_ws", "serve", "--model", "someorg/clap-tiny-test", "--port", "0",
                     "--precision", "fp32"], env)
    try:
        port = served.wait_for_port()

        async def ask_server():
            import websockets

            async with websockets.connect(f"ws://127.0.0.1:{port}/clap", max_size=None) as ws:
                info = await ask(ws, {"op": "info"})
                reply = await ask(ws, {"audio_buffer": b64(tone(660, 48_000, 2.0))})
            return info, reply

        info, reply = asyncio.run(ask_server())
    finally:
        served.kill()
    assert info["model"] == "someorg/clap-tiny-test" and "transformers" in info["preprocessing"]
    assert reply["model"] == "someorg/clap-tiny-test"
    theirs = transformers_audio(hf, folder, [tone(660, 48_000, 2.0)])[0]
    assert float(np.dot(reply["embedding"], theirs)) >= COSINE

    absent = subprocess.run([sys.executable, "-m", "clap_ws", "serve", "--model", "someorg/absent"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert absent.returncode == 2
    assert "someorg/absent is not in the Hugging Face cache" in absent.stderr
    assert "clap-ws download someorg/absent" in absent.stderr and "Traceback" not in absent.stderr


def test_library_build_takes_model_and_refuses_another(folders, tmp_path, capsys):
    _, folder = folders["tiny"]
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    import soundfile

    for i, clip in enumerate([tone(300), noise(seed=1)]):
        soundfile.write(sounds / f"{i}.wav", clip, 48_000)
    cache = hub_cache(tmp_path / "hub", "someorg/clap-tiny-test", folder)
    lib = tmp_path / "lib.npz"
    env = offline_env(tmp_path, HF_HUB_CACHE=str(cache))
    run = [sys.executable, "-m", "clap_ws", "library", "build", str(sounds), "--out", str(lib), "--no-progress"]
    built = subprocess.run([*run, "--model", "someorg/clap-tiny-test"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    info = json.loads(subprocess.run([sys.executable, "-m", "clap_ws", "library", "info", str(lib)], env=env,
                                     capture_output=True, text=True, timeout=120).stdout)
    assert info["model"]["name"] == "someorg/clap-tiny-test"
    soundfile.write(sounds / "new.wav", chirp(), 48_000)  # something to embed, with another model
    other = subprocess.run([*run, "--untrained"], env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "someorg/clap-tiny-test" in other.stderr


# ---- bad folders ---------------------------------------------------------------------
@pytest.fixture
def bad(folders, tmp_path):
    """A copy of the tiny folder to break."""
    return Path(shutil.copytree(folders["tiny"][1], tmp_path / "broken"))


def serve_fails(folder: Path, capsys) -> str:
    """What ``clap-ws serve --checkpoint folder`` logs as it exits with 2."""
    capsys.readouterr()
    assert main(["serve", "--checkpoint", str(folder), "--port", "0"]) == 2
    return capsys.readouterr().err


def test_a_folder_without_weights(bad, capsys):
    (bad / "model.safetensors").unlink()
    assert "has a config.json but no weights (model.safetensors or pytorch_model.bin)" in serve_fails(bad, capsys)


def test_another_model_type(bad, capsys):
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert "holds a 'bert' model (config.json model_type), not a CLAP one" in serve_fails(bad, capsys)


def test_weights_that_do_not_match_the_config(bad, capsys):
    config = json.loads((bad / "config.json").read_text())
    config["audio_config"].update(depths=[2, 2, 12, 2], hidden_size=1024, patch_embeds_hidden_size=128)
    (bad / "config.json").write_text(json.dumps(config))
    text = serve_fails(bad, capsys)
    assert "the weights do not fit the HTSAT-base that config.json describes" in text
    assert "of the wrong shape" in text or "missing tensors" in text
    config["audio_config"].update(depths=[2, 2, 4, 2])
    (bad / "config.json").write_text(json.dumps(config))
    assert "does not match HTSAT-base" in serve_fails(bad, capsys)


def test_a_missing_or_malformed_tokenizer(bad, capsys, tmp_path):
    tokenizer = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").unlink()
    assert "has no tokenizer (tokenizer.json, or vocab.json + merges.txt)" in serve_fails(bad, capsys)
    broken = json.loads(tokenizer)
    broken["model"]["vocab"], broken["model"]["merges"] = {}, []
    (bad / "tokenizer.json").write_text(json.dumps(broken))
    with pytest.raises(ModelError, match="does not tokenise"):
        TransformersFolder.read(bad).tokenizer()


def test_a_bad_folder_exits_without_a_traceback(bad, tmp_path):
    (bad / "model.safetensors").unlink()
    done = subprocess.run([sys.executable, "-m", "clap_ws", "serve", "--checkpoint", str(bad)],
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no weights" in done.stderr and "Traceback" not in done.stderr
