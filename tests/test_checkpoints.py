"""Checkpoint files in laion-clap's own format, parity with laion-clap, and precision."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, chirp, cosine, noise, tone, write_laion_checkpoint
from hypothesis import given
from hypothesis import strategies as st

from clap_ws.errors import ModelError, TextUnavailable
from clap_ws.extractor import CLAPExtractor
from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import (
    Architecture,
    detect_architecture,
    read_checkpoint,
    sha256_of,
)
from clap_ws.model.roberta import Roberta
from clap_ws.model.tokenizer import tokenize
from clap_ws.model.towers import (
    AudioBody,
    AudioTower,
    FftSpectrogram,
    FrontEnd,
    PackedLinear,
    TextTower,
    can_pack_linears,
    chunk_sizes,
    fusion_mel,
    own_copy,
    pack_linears,
)
from clap_ws.model.towers import int16_round_trip as quantize


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return ClapModel.from_checkpoint(tiny_checkpoint, precision="fp32")


def test_tiny_checkpoint_loads_with_module_prefix_and_position_ids(tiny, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in state)
    assert "module.text_branch.embeddings.position_ids" in state
    assert tiny.architecture == Architecture("HTSAT-tiny")
    assert tiny.identity.name == "630k-audioset-best.pt"
    assert tiny.identity.sha256 == sha256_of(tiny_checkpoint) and len(tiny.identity.sha256) == 64
    # every tensor came from the file, not from a fresh initialisation
    loaded = tiny.net.state_dict()
    for key, value in state.items():
        key = key[len("module."):]
        if key in loaded:
            assert torch.equal(loaded[key], value), key


def test_loaded_weights_differ_from_the_default_untrained_model(tiny, fp32_model):
    x = tone(seconds=2)
    a = CLAPExtractor(model=tiny).extract_embedding(x)
    b = CLAPExtractor(model=fp32_model).extract_embedding(x)
    assert cosine(a, b) < 0.99


@pytest.mark.slow
def test_base_checkpoint_is_detected_without_being_told(tmp_path):
    net = ClapModel.untrained(Architecture("HTSAT-base"), seed=2, precision="fp32").net
    path = write_laion_checkpoint(net, tmp_path / "music_audioset_epoch_15_esc_90.14.pt")
    model = ClapModel.from_checkpoint(path, precision="fp32")
    assert model.architecture.audio == "HTSAT-base" and not model.architecture.fusion
    emb = CLAPExtractor(model=model).extract_embedding(noise(seconds=1))
    assert emb.shape == (512,) and np.linalg.norm(emb) == pytest.approx(1, abs=1e-5)


def test_fusion_checkpoint_is_detected_and_runs(tmp_path):
    net = ClapModel.untrained(Architecture("HTSAT-tiny", "aff_2d"), seed=3, precision="fp32").net
    path = write_laion_checkpoint(net, tmp_path / "630k-audioset-fusion-best.pt")
    assert detect_architecture(read_checkpoint(path)) == Architecture("HTSAT-tiny", "aff_2d")
    ex = CLAPExtractor(model=ClapModel.from_checkpoint(path, precision="fp32"))
    a, b = ex.extract_batch([chirp(seconds=3), chirp(seconds=25)])
    assert cosine(a, b) < 0.9999 and np.isfinite(a).all() and np.isfinite(b).all()
    if ClapModel.untrained(precision="auto").precision == "bf16":  # the fusion input is cast with the weights
        half = CLAPExtractor(model=ClapModel.from_checkpoint(path, precision="bf16"))
        c, d = half.extract_batch([chirp(seconds=3), chirp(seconds=25)])
        assert cosine(a, c) >= 0.999 and cosine(b, d) >= 0.999


def test_fusion_mel_matches_librosa():
    librosa = pytest.importorskip("librosa")
    from clap_ws.model import laion

    cfg = laion.load_clap_module().CLAPAudioCfp(**laion.model_config("HTSAT-tiny")["audio_cfg"])
    x = np.concatenate([chirp(seconds=5), noise(seconds=5)])
    ours = fusion_mel(torch.from_numpy(x)[None], cfg)[0, 0].numpy()
    ref = librosa.power_to_db(librosa.feature.melspectrogram(
        y=x.astype(np.float64), sr=48000, n_fft=1024, hop_length=480, win_length=1024, center=True,
        pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=14000, htk=True, norm=None),
        ref=1.0, amin=1e-10, top_db=None).T
    assert ours.shape == ref.shape == (1001, 64)
    audible = ref > -60  # below that, float32 rounding in the STFT dominates both
    assert audible.mean() > 0.5
    assert np.abs(ours - ref)[audible].max() < 0.05  # dB


def test_unusable_files_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ClapModel.from_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        ClapModel.from_checkpoint(tmp_path / "garbage.pt")
    torch.save({"state_dict": {"module.something.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a LAION-CLAP HTSAT checkpoint"):
        ClapModel.from_checkpoint(tmp_path / "other.pt")


class Payload:  # stands for arbitrary pickled objects
    pass


def test_pickled_objects_need_allow_pickle(tmp_path, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["args"] = Payload()
    path = tmp_path / "with-objects.pt"
    torch.save(ckpt, path, pickle_module=pickle)
    with pytest.raises(ModelError, match="--allow-pickle"):
        ClapModel.from_checkpoint(path)
    model = ClapModel.from_checkpoint(path, precision="fp32", allow_pickle=True)
    assert model.architecture.audio == "HTSAT-tiny"


def test_text_without_tokenizer_is_a_clear_error_and_audio_still_works(tiny):
    ex = CLAPExtractor(model=tiny)  # loaded from a checkpoint with no tokenizer files around
    assert tiny.tokenizer is None
    with pytest.raises(TextUnavailable, match="clap-ws download"):
        ex.extract_text(["a dog barking"])
    assert ex.extract_embedding(tone(seconds=1)).shape == (512,)


@pytest.mark.cpu_class
@pytest.mark.slow
def test_parity_with_laion_clap(tmp_path, tiny_checkpoint):
    """fp32, same weights, same 48 kHz clips: laion-clap's own embedding (cosine >= 0.99999)."""
    from clap_ws.model.tokenizer import byte_level_tokenizer

    clips = {"a_short_3s": chirp(seconds=3), "b_exactly_10s": noise(seconds=10, seed=4),
             "c_tone_1s": tone(523.25, seconds=1)}
    texts = ["a dog barking", "rain on a tin roof at night", "an old analogue synthesizer pad"]
    np.savez(tmp_path / "clips.npz", **clips)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "tests" / "laion_reference.py"), str(tiny_checkpoint), "HTSAT-tiny",
                    str(tmp_path / "clips.npz"), str(tmp_path / "texts.json"), str(tmp_path / "ref.npz")],
                   check=True, env=env, timeout=600)
    ref = np.load(tmp_path / "ref.npz")

    model = ClapModel.from_checkpoint(tiny_checkpoint, precision="fp32", tokenizer=byte_level_tokenizer())
    ex = CLAPExtractor(model=model)
    ours = ex.extract_batch([clips[k] for k in sorted(clips)])
    for name, a, b in zip(sorted(clips), ours, ref["audio"]):
        assert cosine(a, b) >= 0.99999, name
    ours_text = ex.extract_text(texts)  # padded to the longest text, laion-clap pads to 77
    for a, b in zip(ours_text, ref["text"]):
        assert cosine(a, b) >= 0.99999


def assert_embeddings_close(model: ClapModel, reference: ClapModel) -> None:
    """Sounds of 2, 4 and 10 s and three prompts embed within cosine 0.999 of the reference model's."""
    clips = [tone(seconds=2), noise(seconds=4, seed=9), chirp(seconds=10)]
    ours, theirs = CLAPExtractor(model=model), CLAPExtractor(model=reference)
    for x, y in zip(ours.extract_batch(clips), theirs.extract_batch(clips)):
        assert cosine(x, y) >= 0.999
    texts = ["a warm bell", "noise", "a long sweeping synth pad with slow attack"]
    for x, y in zip(model.embed_text(texts), reference.embed_text(texts)):
        assert cosine(x, y) >= 0.999


@pytest.mark.cpu_class
def test_bf16_stays_close_to_fp32(model, fp32_model):
    if model.precision != "bf16":
        pytest.skip("this CPU has no native bf16, so auto precision is fp32")
    assert next(model.net.text_branch.parameters()).dtype == torch.bfloat16  # cast once, not autocast
    assert next(fp32_model.net.text_branch.parameters()).dtype == torch.float32
    # the front end is never rounded to bf16: its kernels stay an exact DFT, so it runs as an FFT
    assert isinstance(model._front_end.spectrogram, FftSpectrogram)
    assert isinstance(fp32_model._front_end.spectrogram, FftSpectrogram)
    assert all(p.dtype == torch.float32 for p in model.net.audio_branch.spectrogram_extractor.parameters())
    assert_embeddings_close(model, fp32_model)
    assert model.logit_scale == pytest.approx(fp32_model.logit_scale, rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_gpus_autocast_path_stays_close_to_fp32_on_a_cpu(fp32_model, precision):
    """A GPU's way to reduced precision (autocast, fp32 weights, an fp32 front end) run by the CPU, which autocasts too.

    The closest this machine gets to the CUDA path: without the fp32 front
    end, fp16 turns a 2-s sine's power spectrum into inf and its embedding
    into NaN (checked by hand). ``--precision fp16`` is refused on a CPU for
    users (slow, pointless); the constructor takes a resolved precision.
    """
    fresh = ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0, precision="fp32")  # its own network, to mutate
    mixed = fresh.variant(precision=precision, autocast=True)
    assert mixed.autocast and not fp32_model.autocast  # a CPU's default: cast once
    assert {p.dtype for p in mixed.net.parameters()} == {torch.float32}  # not cast: autocast casts per call
    assert not any(isinstance(m, PackedLinear) for m in mixed._text.modules())  # not packed
    assert_embeddings_close(mixed, fp32_model)
    loud = tone(seconds=2, amp=1.0)
    a, b = (CLAPExtractor(model=m).extract_embedding(loud) for m in (mixed, fp32_model))
    assert np.isfinite(a).all() and cosine(a, b) >= 0.999
    assert np.abs(a - b).max() > 1e-5  # it ran in reduced precision: fp32 against fp32 differs by about 1e-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_stays_close_to_fp32_on_the_cpu(fp32_model, precision):
    """The same seeded weights on a GPU, in each precision, against the CPU's fp32 (never run here: no GPU was lent)."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    gpu = ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0, device="cuda", precision=precision)
    assert gpu.device.type == "cuda" and gpu.precision == precision
    assert_embeddings_close(gpu, fp32_model)


def laion_audio(model: ClapModel, windows: np.ndarray) -> np.ndarray:
    """laion-clap's own HTSAT forward and projection on the model's network (clap-ws never changes its modules),
    after laion-clap's int16 round trip, as the model does."""
    net, w = model.net, torch.from_numpy(quantize(windows))
    batch = {"waveform": w}
    if model.architecture.fusion:
        batch.update(longer=torch.zeros(len(w), dtype=torch.bool), mel_fusion=fusion_mel(w, net.audio_cfg))
    with torch.inference_mode():
        return net.audio_projection(net.audio_branch(batch, mixup_lambda=None, device=w.device)["embedding"]).numpy()


@pytest.mark.parametrize("architecture", [Architecture("HTSAT-tiny"), Architecture("HTSAT-tiny", "aff_2d")],
                         ids=["plain", "fusion"])
@pytest.mark.cpu_class
def test_swin_serving_forwards_match_laion_clap_and_follow_new_weights(architecture):
    """clap_ws.model.swin against laion-clap's forwards on the same network: a call of 4 windows (shift masks
    repeated per clip), 1 window, and again after the attention biases change in place."""
    model = ClapModel.untrained(architecture, seed=2, precision="fp32", chunk=4)
    branch = model.net.audio_branch
    windows = np.stack([chirp(seconds=10), noise(seconds=10, seed=3), tone(330.0, seconds=10),
                        chirp(2000.0, 50.0, seconds=10)])

    def assert_same(ours, ours_one, theirs):
        for a, b in zip(ours, theirs):
            assert cosine(a, b) >= 0.99999
        assert cosine(ours_one[0], theirs[2]) >= 0.99999

    theirs = laion_audio(model, windows)
    before = model.embed_windows(windows)  # this also caches the attention biases
    assert_same(before, model.embed_windows(windows[2:3]), theirs)
    with torch.no_grad():  # what load_state_dict does to a loaded network: the same tensors, new values
        for stage in branch.layers:
            for block in stage.blocks:
                block.attn.relative_position_bias_table.mul_(100.0)
    after, after_one = model.embed_windows(windows), model.embed_windows(windows[2:3])
    assert_same(after, after_one, laion_audio(model, windows))
    # the change moved the output 10x further than the tolerance above, so stale biases would fail it
    assert min(cosine(a, b) for a, b in zip(before, after)) < 0.9999
    assert "forward" not in vars(branch) and "forward_features" not in vars(branch)  # laion-clap's modules as they were


@pytest.mark.cpu_class
def test_roberta_serving_forward_matches_transformers(model):
    """clap_ws.model.roberta against transformers' own RobertaModel forward on the same weights (the served
    precision; one text, and texts of different lengths padded together); other modules are left alone."""
    net = model.net
    texts = ["a warm bell", "noise", "a long sweeping synth pad with slow attack and a bright shimmering tail"]
    ours, ours_one = model.embed_text(texts), model.embed_text(texts[:1])

    def transformers(batch):
        tokens = tokenize(model.tokenizer, batch)
        with torch.inference_mode():
            raw = net.text_projection(net.text_branch(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"])["pooler_output"])
        return torch.nn.functional.normalize(raw.float(), dim=-1).numpy()

    theirs, theirs_one = transformers(texts), transformers(texts[:1])
    for a, b in zip(ours, theirs):
        assert cosine(a, b) >= 0.9999
    assert cosine(ours_one[0], theirs_one[0]) >= 0.9999
    assert cosine(ours_one[0], ours[0]) >= 0.999  # padding the batch does not change a text
    assert Roberta.can_serve(net.text_branch) and not Roberta.can_serve(torch.nn.Linear(4, 4))
    assert "forward" not in vars(net.text_branch)  # transformers' module as it was


@pytest.mark.parametrize("name", ["model", "fp32_model"])
def test_cpu_linears_are_packed_once_and_match_plain(name, request):
    """Each model packs the linears of its own towers; laion-clap's modules and other models are untouched."""
    model = request.getfixturevalue(name)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[model.precision]
    if not can_pack_linears(model.device, dtype):
        pytest.skip("packing is for fp32, and for bf16 where oneDNN has native bf16, on a CPU")
    text_packed = [m for m in model._text.modules() if isinstance(m, PackedLinear)]
    assert len(text_packed) == 75  # 12 layers x 6, the pooler, the projection's two
    assert not any(type(m) is torch.nn.Linear for tower in (model._text, model._audio) for m in tower.modules())
    assert any(isinstance(m, PackedLinear) for m in model._audio.modules())
    assert not any(isinstance(m, PackedLinear) for m in model.net.modules())  # the network's own modules
    assert pack_linears(model._text) == 0  # already packed
    variant = model.variant()
    assert not set(map(id, variant._text.modules())) & set(map(id, model._text.modules()))  # modules of its own
    texts = ["a warm bell", "noise", "a long sweeping synth pad with slow attack"]
    windows = np.stack([chirp(seconds=10), noise(seconds=10, seed=5)])
    fast = model.embed_text(texts), model.embed_windows(windows)
    own = own_copy(model.net)  # the same towers, unpacked
    text = TextTower(own.text_branch, own.text_projection)
    audio = AudioTower(FrontEnd(own.audio_branch, dtype), AudioBody(own.audio_branch, own.audio_projection), False,
                       own.audio_cfg)
    with torch.inference_mode():
        tokens = tokenize(model.tokenizer, texts)
        plain = (torch.nn.functional.normalize(text(tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1),
                 audio(torch.from_numpy(windows)).float())
    for fast_rows, plain_rows in zip(fast, plain):
        for x, y in zip(fast_rows, plain_rows.numpy()):
            assert cosine(x, y) >= 0.9999


@given(count=st.integers(0, 200), chunk=st.integers(1, 64))
def test_chunk_sizes_are_powers_of_two_within_the_chunk(count, chunk):
    sizes = chunk_sizes(count, chunk)
    assert sum(sizes) == count and sizes == sorted(sizes, reverse=True)
    assert all(s & (s - 1) == 0 and 1 <= s <= chunk for s in sizes)
    assert len(sizes) <= count // (1 << (chunk.bit_length() - 1)) + chunk.bit_length()


@pytest.mark.cpu_class
def test_chunked_windows_match_one_at_a_time(fp32_model):
    windows = np.stack([chirp(seconds=10), noise(seconds=10, seed=1), tone(seconds=10), noise(seconds=10, seed=2),
                        tone(seconds=10, freq=880), chirp(seconds=10) * 0.1, noise(seconds=10, seed=3)])
    assert fp32_model.chunk == 4  # auto on a CPU: 7 windows run as 4 + 2 + 1
    together = fp32_model.embed_windows(windows)
    one = fp32_model.variant(chunk=1)
    alone = one.embed_windows(windows)
    assert together.shape == alone.shape == (7, 512)
    for x, y in zip(together, alone):
        assert cosine(x, y) >= 0.99999


def test_many_texts_go_through_in_chunks_with_the_same_result(model, monkeypatch):
    monkeypatch.setattr("clap_ws.model.clap.TEXT_CHUNK", 2)  # 5 texts run as 2 + 2 + 1
    texts = ["a warm bell", "noise", "a long sweeping synth pad with slow attack", "kick", "glass breaking"]
    together = model.embed_text(texts)
    assert together.shape == (5, 512) and model.embed_text([]).shape == (0, 512)
    for text, row in zip(texts, together):
        assert cosine(model.embed_text([text])[0], row) >= 0.9999


@pytest.mark.slow
def test_compiled_model_matches_eager(model):
    """--compile: both towers compiled (one audio chunk shape here; ~2 min on 2 cores) match eager."""
    compiled = model.variant(chunk=1, compile=True)  # modules of its own over the same weights
    assert not any(isinstance(m, PackedLinear) for m in compiled._text.modules())  # Inductor packs by itself
    assert any(isinstance(m, PackedLinear) for m in model._text.modules())  # the eager model keeps its own
    compiled.warm_up()
    assert compiled.describe()["compiled"] is True and model.describe()["compiled"] is False
    clips = [tone(seconds=2), chirp(seconds=10), noise(seconds=15, seed=4)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # warm-up compiled every shape real input has
        alone = CLAPExtractor(model=compiled).extract_embedding(clips[0])  # one short clip: a (1, n) view
        a = CLAPExtractor(model=compiled).extract_batch(clips)
        compiled_texts = compiled.embed_text(["a warm bell", "noise", "a long sweeping synth pad with slow attack"])
        compiled_one = compiled.embed_text(["x y z w"])[0]
    b = CLAPExtractor(model=model).extract_batch(clips)
    for x, y in zip(a, b):
        assert cosine(x, y) >= 0.999
    assert cosine(alone, b[0]) >= 0.999
    texts = ["a warm bell", "noise", "a long sweeping synth pad with slow attack"]  # shapes not seen at warm-up
    for x, y in zip(compiled_texts, model.embed_text(texts)):
        assert cosine(x, y) >= 0.999
    assert cosine(compiled_one, model.embed_text(["x y z w"])[0]) >= 0.999
    fusion = Architecture("HTSAT-tiny", "aff_2d")
    with pytest.raises(ModelError, match="non-fusion"):
        ClapModel(net=model.net, architecture=fusion, identity=model.identity, device=model.device,
                  precision=model.precision, compile=True)
