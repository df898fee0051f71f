"""The tolerance policy (docs/precision.md): fp32 is batch-invariant, bf16 stays within its measured bound.

The same sounds and texts are embedded alone and inside batches of 2, 3 and 8.
On AMX, oneDNN chooses other bf16 kernels for other batch sizes, and a text's
padding follows its batch, so bf16 may move an embedding by up to
``tolerance.BF16_MAX_ABS`` per component; fp32
must not move at all beyond last-bit noise. Repeats of one sound through a
server come from the audio cache, bit for bit. CPU-sensitive: run again under
each emulated CPU class by test_cpu_classes.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ask, assert_same_embeddings, b64, chirp, connect, noise, running_server, tone

from clap_ws import cpu, tolerance
from clap_ws.extractor import CLAPExtractor
from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import Architecture

pytestmark = pytest.mark.cpu_class

CLIPS = [tone(220 + 90 * i, seconds=1 + i % 3) for i in range(4)] + [noise(seconds=2, seed=i) for i in range(2)] \
    + [chirp(seconds=3), chirp(100, 3000, seconds=12)]
TEXTS = ["a dog barking", "rain on a tin roof", "a bell", "an old synthesizer pad with a slow attack"]


@pytest.fixture(scope="module")
def bf16_model(model) -> ClapModel:
    """bf16 whatever the CPU (emulated where it has no native bf16): the bound must hold everywhere."""
    return model if model.precision == "bf16" else ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0,
                                                                       precision="bf16")


def alone_and_batched(model: ClapModel) -> tuple[list[np.ndarray], list[np.ndarray]]:
    extractor = CLAPExtractor(model=model)
    alone = np.stack([extractor.extract_embedding(c) for c in CLIPS])
    pairs = []
    for size in (2, 3, 8):
        for start in range(0, len(CLIPS) - size + 1, size):
            pairs.append((extractor.extract_batch(CLIPS[start:start + size]), alone[start:start + size]))
    texts_alone = np.stack([extractor.extract_text([t])[0] for t in TEXTS])
    pairs.append((extractor.extract_text(TEXTS), texts_alone))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_fp32_is_batch_invariant(fp32_model):
    for batched, alone in zip(*alone_and_batched(fp32_model)):
        assert_same_embeddings(batched, alone, "fp32")


def test_bf16_stays_within_its_bound_whatever_shares_its_batch(bf16_model, fp32_model):
    batched, alone = alone_and_batched(bf16_model)
    for b, a in zip(batched, alone):
        assert_same_embeddings(b, a, "bf16")
    # and the bound is not so loose that fp32 and bf16 look alike to it by accident: bf16 is still close to fp32
    reference = CLAPExtractor(model=fp32_model).extract_batch(CLIPS)
    assert tolerance.disagreement(batched[-2], reference)[1] >= 0.99  # the batch of 8 against fp32


def test_the_bounds_are_the_documented_ones():
    assert tolerance.bounds("bf16") == (2.0**-7, 0.9995)
    assert tolerance.bounds("fp32")[0] == 1e-6
    near, far = np.eye(2) + 7e-3 * np.eye(2)[::-1], np.eye(2) + 9e-3 * np.eye(2)[::-1]
    assert tolerance.agree(np.eye(2), near, "bf16") and not tolerance.agree(np.eye(2), far, "bf16")
    assert not tolerance.agree(np.eye(2), np.eye(2) + 3e-6, "fp32")


async def test_repeats_through_a_server_are_bit_identical(model):
    """Whatever the batch, a sound sent again is answered from the audio cache with the very same bytes."""
    clips = CLIPS[:3]
    async with running_server(model) as server, connect(server) as ws:
        first = [await ask(ws, c.tobytes()) for c in clips]
        for c in clips:  # now all at once: they would share a batch if they reached the model
            await ws.send(c.tobytes())
        import json

        again = [json.loads(await ws.recv()) for _ in clips]
        batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(c) for c in clips]})
    for a, b, e in zip(first, again, batch["embeddings"]):
        assert a["embedding"] == b["embedding"] == e and b["cached"] is True


def test_the_cpu_label_follows_the_oneDNN_cap(monkeypatch):
    """An Intel AMX server's flags, read under each cap: the label says what oneDNN may use, AVX-VNNI included."""
    flags = {"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    expected = {"": "AVX-VNNI AVX-512 VNNI BF16 AMX", "AVX2": "AVX2", "AVX2_VNNI": "AVX2 AVX-VNNI",
                "AVX512_CORE": "AVX-512", "AVX512_CORE_VNNI": "AVX-512 VNNI", "AVX512_CORE_BF16": "AVX-512 VNNI BF16",
                "AVX512_CORE_FP16": "AVX-VNNI AVX-512 VNNI BF16", "AVX512_CORE_AMX": "AVX-VNNI AVX-512 VNNI BF16 AMX"}
    for cap, label in expected.items():
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu.instruction_set() == label, cap
        assert cpu.has_native_bf16() == ("BF16" in label)
