"""Text embeddings, prompt similarity, references, archives, novelty and behaviour descriptors on a real server."""

import asyncio
import contextlib
import json

import numpy as np
import pytest
import torch
from helpers import ask, b64, chirp, connect, noise, running_server, tone

from clap_ws.audio import windows
from clap_ws.errors import ErrorCode, TextUnavailable
from clap_ws.extractor import CLAPExtractor
from clap_ws.inference import AudioJob, Inference, Result, TextJob
from clap_ws.projection import Projection
from clap_ws.search.archive import Archives


def unit_rows(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 512))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def extractor(model):
    return CLAPExtractor(model=model)


async def test_embed_text_matches_the_api_and_the_cache_saves_model_calls(server, extractor):
    texts = ["a dog barking", "rain on a roof", "a warm analogue pad"]
    async with connect(server) as ws:
        first = await ask(ws, {"op": "embed_text", "texts": texts, "id": "t"})
        calls = server.service.text_model_calls
        second = await ask(ws, {"op": "embed_text", "texts": texts})
        calls_after_second = server.service.text_model_calls
        partly = await ask(ws, {"op": "embed_text", "texts": [texts[0], "a new prompt"]})
    assert first["status"] == "OK" and first["op"] == "embed_text" and first["id"] == "t"
    assert first["count"] == 3 and first["cached"] == 0 and first["model"] == "untrained"
    np.testing.assert_allclose(first["embeddings"], extractor.extract_text(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(first["embeddings"], axis=1), 1, atol=1e-5)
    assert second["cached"] == 3 and calls_after_second == calls  # no model call
    assert second["embeddings"] == first["embeddings"]
    assert partly["cached"] == 1 and server.service.text_model_calls == calls + 1


async def test_a_prompt_asked_for_by_many_at_once_is_embedded_once(server, extractor):
    prompt = ["a brand new prompt nobody asked for before", "a second fresh one"]
    calls = server.service.text_model_calls
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(server)) for _ in range(12)]
        leaver = await stack.enter_async_context(connect(server))
        await leaver.send(json.dumps({"op": "embed_text", "texts": prompt}))
        await leaver.close()  # gone while its prompt is in flight: the others still get theirs
        for ws in sockets:
            await ws.send(json.dumps({"op": "embed_text", "texts": prompt[::-1] + prompt}))
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for ws in sockets]
        also_audio = await ask(sockets[0], {"audio_buffer": b64(tone(seconds=0.5)), "prompts": prompt})
    assert all(r["status"] == "OK" and r["count"] == 4 for r in replies), replies[0]
    assert all(r["embeddings"] == replies[0]["embeddings"] for r in replies)
    np.testing.assert_allclose(replies[0]["embeddings"], extractor.extract_text(prompt[::-1] + prompt), atol=1e-5)
    assert server.service.text_model_calls == calls + 1  # one model call for 13 requests
    assert also_audio["status"] == "OK" and server.service.text_model_calls == calls + 1  # now cached
    assert not any(server.service.texts.flying(t) for t in prompt)  # nothing left in flight


async def test_prompts_similarity_and_probs_match_compute_similarity(server, extractor):
    x = chirp(seconds=2)
    prompts = ["a rising whistle", "a kick drum", "white noise"]
    async with connect(server) as ws:
        reply = await ask(ws, {"audio_buffer": b64(x), "prompts": prompts, "probs": True})
        text = await ask(ws, {"op": "embed_text", "texts": prompts})
    assert list(reply["similarity"]) == prompts
    for prompt, vec in zip(prompts, text["embeddings"]):
        expected = CLAPExtractor.compute_similarity(reply["embedding"], vec)
        assert reply["similarity"][prompt] == pytest.approx(expected, abs=1e-6)
    probs = np.array([reply["probs"][p] for p in prompts])
    assert probs.sum() == pytest.approx(1, abs=1e-9)
    sims = np.array([reply["similarity"][p] for p in prompts])
    expected = np.exp(sims * server.model.logit_scale) / np.exp(sims * server.model.logit_scale).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-9)


async def test_references_and_batch_extras(server):
    a, b = tone(440, seconds=1), noise(seconds=1, seed=3)
    async with connect(server) as ws:
        ea = (await ask(ws, a.tobytes()))["embedding"]
        eb = (await ask(ws, b.tobytes()))["embedding"]
        one = await ask(ws, {"audio_buffer": b64(a), "references": [ea, eb]})
        batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(a), b64(b)], "references": [ea, eb],
                               "prompts": ["x", "y"]})
    assert one["reference_similarity"][0] == pytest.approx(1, abs=1e-5)
    assert one["reference_similarity"][1] == pytest.approx(CLAPExtractor.compute_similarity(ea, eb), abs=1e-5)
    assert len(batch["reference_similarity"]) == 2 and len(batch["similarity"]) == 2
    assert batch["reference_similarity"][1][1] == pytest.approx(1, abs=1e-5)
    assert set(batch["similarity"][0]) == {"x", "y"}


async def test_similarity_errors(server):
    x = b64(tone(seconds=0.5))
    cases = [
        ({"audio_buffer": x, "prompts": []}, "bad_request"),
        ({"audio_buffer": x, "prompts": [""]}, "bad_request"),
        ({"audio_buffer": x, "prompts": ["ok", 3]}, "bad_request"),
        ({"audio_buffer": x, "probs": True}, "bad_request"),
        ({"audio_buffer": x, "prompts": ["a"], "reply": "binary"}, "bad_request"),
        ({"audio_buffer": x, "references": [[0.0] * 512]}, "bad_request"),
        ({"audio_buffer": x, "references": [[1.0] * 100]}, "bad_request"),
        ({"audio_buffer": x, "references": [["a"] * 512]}, "bad_request"),
        ({"op": "embed_text", "texts": []}, "bad_request"),
        ({"op": "embed_text", "texts": "not a list"}, "bad_request"),
        ({"op": "embed_text", "texts": ["t"] * 2000}, "too_many_items"),
    ]
    async with connect(server) as ws:
        for message, code in cases:
            reply = await ask(ws, message)
            assert reply["status"] == "ERROR" and reply["error"]["code"] == code, (message, reply)
        assert (await ask(ws, {"op": "embed_text", "texts": ["still fine"]}))["status"] == "OK"


async def test_different_prompts_at_the_same_moment_share_model_calls(server):
    prompts = [f"a fresh prompt number {i}" for i in range(12)]
    calls = server.service.text_model_calls
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(server)) for _ in prompts]
        for ws, prompt in zip(sockets, prompts):
            await ws.send(json.dumps({"op": "embed_text", "texts": [prompt]}))
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for ws in sockets]
    assert all(r["status"] == "OK" and r["count"] == 1 for r in replies), replies[0]
    # the first prompt runs alone; the others queue while it runs and go through in one call
    assert 1 <= server.service.text_model_calls - calls <= 4, server.service.text_model_calls - calls
    alone = server.service.model.embed_text(prompts)
    for reply, expected in zip(replies, alone):
        assert float(np.dot(reply["embeddings"][0], expected)) >= 0.9999


def test_texts_of_one_batch_go_through_the_model_in_one_call(model):
    texts = ["a warm bell", "noise", "a long sweeping synth pad with slow attack"]
    jobs = [TextJob(texts[:1]), AudioJob([windows(tone(seconds=2))]), TextJob(texts[1:])]
    inference = Inference(model)
    first, audio, rest = inference(jobs)
    assert inference.text_calls == 1
    assert first.embeddings.shape == (1, 512) and rest.embeddings.shape == (2, 512)
    assert audio.embeddings.shape == (1, 512)
    for got, expected in zip(np.concatenate([first.embeddings, rest.embeddings]), model.embed_text(texts)):
        assert float(np.dot(got, expected)) >= 0.9999
    no_text = model.variant(tokenizer=None)
    first, audio, rest = Inference(no_text)(jobs)  # a text failure fails the text jobs only
    assert isinstance(first, TextUnavailable) and isinstance(rest, TextUnavailable)
    assert isinstance(audio, Result) and audio.embeddings.shape == (1, 512)


async def test_text_without_tokenizer_fails_clearly_and_audio_goes_on(model):
    no_text = model.variant(tokenizer=None)
    async with running_server(no_text) as server:
        async with connect(server) as ws:
            text = await ask(ws, {"op": "embed_text", "texts": ["a bell"]})
            prompts = await ask(ws, {"audio_buffer": b64(tone(seconds=0.5)), "prompts": ["a bell"]})
            audio = await ask(ws, tone(seconds=0.5).tobytes())
    assert text["error"]["code"] == prompts["error"]["code"] == ErrorCode.TEXT_UNAVAILABLE
    assert "clap-ws download" in text["error"]["message"]
    assert audio["status"] == "OK"


# ---- archives ------------------------------------------------------------------------
def brute_novelty(archive: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    cos = queries @ archive.T
    nearest = -np.sort(-cos, axis=1)[:, :k]
    return (1 - nearest).mean(axis=1)


async def test_archive_ops_and_novelty_against_brute_force(server):
    stored, queries = unit_rows(200, 1), unit_rows(7, 2)
    async with connect(server) as ws:
        add1 = await ask(ws, {"op": "archive_add", "archive": "run-17", "embeddings": stored[:120].tolist(),
                              "ids": [f"g0-{i}" for i in range(120)]})
        add2 = await ask(ws, {"op": "archive_add", "archive": "run-17", "embeddings": stored[120:].tolist()})
        info = await ask(ws, {"op": "archive_info", "archive": "run-17"})
        novelty = await ask(ws, {"op": "novelty", "archive": "run-17", "k": 15, "embeddings": queries.tolist()})
        one = await ask(ws, {"op": "novelty", "archive": "run-17", "embedding": queries[0].tolist()})
        found = await ask(ws, {"op": "archive_search", "archive": "run-17", "embedding": stored[5].tolist(),
                               "top_k": 3})
        listing = await ask(ws, {"op": "archive_info"})
        dropped = await ask(ws, {"op": "archive_drop", "archive": "run-17"})
        gone = await ask(ws, {"op": "novelty", "archive": "run-17", "embedding": queries[0].tolist()})
    assert (add1["added"], add1["count"], add2["count"]) == (120, 120, 200)
    assert info["count"] == 200 and info["archive"] == "run-17"
    np.testing.assert_allclose(novelty["novelty"], brute_novelty(stored, queries, 15), atol=1e-6)
    assert novelty["k"] == 15 and one["novelty"][0] == pytest.approx(novelty["novelty"][0], abs=1e-7)
    assert found["matches"][0][0] == {"id": "g0-5", "score": pytest.approx(1, abs=1e-5)}
    assert len(found["matches"][0]) == 3 and found["matches"][0][1]["id"] != "g0-5"
    assert "run-17" in [a["archive"] for a in listing["archives"]]
    assert dropped["dropped"] == 200 and gone["error"]["code"] == ErrorCode.UNKNOWN_ARCHIVE


async def test_archive_errors(server):
    v = unit_rows(3, 4).tolist()
    async with connect(server) as ws:
        await ask(ws, {"op": "archive_add", "archive": "small", "embeddings": v})
        cases = [
            ({"op": "novelty", "archive": "small", "k": 5, "embeddings": v}, "k_too_large"),
            ({"op": "novelty", "archive": "nope", "embeddings": v}, "unknown_archive"),
            ({"op": "archive_info", "archive": "nope"}, "unknown_archive"),
            ({"op": "archive_drop", "archive": "nope"}, "unknown_archive"),
            ({"op": "archive_add", "archive": "../etc", "embeddings": v}, "bad_request"),
            ({"op": "archive_add", "archive": "x", "embeddings": v, "ids": [1]}, "bad_request"),
            ({"op": "archive_add", "archive": "x"}, "bad_request"),
            ({"op": "archive_add", "archive": "x", "embeddings": v, "embedding": v[0]}, "bad_request"),
            ({"op": "novelty", "archive": "small", "embeddings": [[0.1] * 511]}, "bad_request"),
            ({"op": "novelty", "archive": "small", "k": 0, "embeddings": v}, "bad_request"),
        ]
        for message, code in cases:
            reply = await ask(ws, message)
            assert reply["status"] == "ERROR" and reply["error"]["code"] == code, (message, reply)
            assert reply["error"]["message"]
        assert (await ask(ws, {"op": "novelty", "archive": "small", "k": 3, "embeddings": v}))["status"] == "OK"


async def test_audio_into_archives_and_one_round_trip_generation(server):
    sounds = [tone(200 * (i + 1), seconds=0.5) for i in range(4)]
    async with connect(server) as ws:
        embeds = [(await ask(ws, s.tobytes()))["embedding"] for s in sounds]
        by_audio = await ask(ws, {"op": "archive_add", "archive": "gen", "audio_buffers": [b64(s) for s in sounds],
                                  "ids": list(range(4))})
        same = await ask(ws, {"op": "archive_search", "archive": "gen", "embeddings": embeds, "top_k": 1})
        # a generation in one message: embed, score against prompts, novelty, and add
        first = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(chirp(seconds=1)), b64(noise(seconds=1))],
                               "prompts": ["bright"], "archive": "loop", "archive_add": True, "k": 2,
                               "ids": ["a", "b"]})
        second = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(tone(seconds=1))],
                                "archive": "loop", "archive_add": True, "k": 2})
    assert by_audio["added"] == 4
    assert [m[0]["id"] for m in same["matches"]] == [0, 1, 2, 3]
    assert first["novelty"] == [None, None] and first["archive_count"] == [2, 2]
    expected = brute_novelty(np.array(first["embeddings"]), np.array(second["embeddings"]), 2)
    assert second["novelty"][0] == pytest.approx(expected[0], abs=1e-6)
    assert second["archive_count"] == [3]


async def test_archives_persist_across_restarts(model, tmp_path):
    stored, queries = unit_rows(50, 5), unit_rows(2, 6)
    async with running_server(model, archives=Archives(tmp_path / "arch"), archive_flush_s=0.2) as server:
        async with connect(server) as ws:
            await ask(ws, {"op": "archive_add", "archive": "run-1", "embeddings": stored.tolist(),
                           "ids": [{"genome": i} for i in range(50)]})
            before = await ask(ws, {"op": "novelty", "archive": "run-1", "embeddings": queries.tolist(), "k": 5})
    assert (tmp_path / "arch" / "run-1.npz").is_file()
    async with running_server(model, archives=Archives(tmp_path / "arch")) as server:
        async with connect(server) as ws:
            info = await ask(ws, {"op": "archive_info", "archive": "run-1"})
            after = await ask(ws, {"op": "novelty", "archive": "run-1", "embeddings": queries.tolist(), "k": 5})
            found = await ask(ws, {"op": "archive_search", "archive": "run-1", "embedding": stored[9].tolist(),
                                   "top_k": 1})
    assert info["count"] == 50 and after["novelty"] == before["novelty"]
    assert found["matches"][0][0]["id"] == {"genome": 9}


# ---- behaviour descriptors -------------------------------------------------------------
async def test_projection_npz_on_clap_bd(model, tmp_path):
    rng = np.random.default_rng(8)
    components, mean = rng.standard_normal((2, 512)).astype("f4"), rng.standard_normal(512).astype("f4") * 0.01
    np.savez(tmp_path / "pca.npz", components=components, mean=mean)
    async with running_server(model, projection=Projection.load(tmp_path / "pca.npz")) as server:
        async with connect(server, path="/clap-bd") as ws:
            reply = await ask(ws, tone(seconds=0.5).tobytes())
            batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(tone(seconds=0.5))] * 2})
        async with connect(server) as ws:
            plain = await ask(ws, tone(seconds=0.5).tobytes())
            info = await ask(ws, {"op": "info"})
    expected = (np.array(reply["embedding"], "f4") - mean) @ components.T
    np.testing.assert_allclose(reply["behavior_descriptor"], expected, atol=1e-5)
    assert len(batch["behavior_descriptor"]) == 2 and "behavior_descriptor" not in plain
    assert info["projection"] == {"source": "pca.npz", "dimensions": 2, "version": 1}
    assert reply["projection_version"] == 1


async def test_projection_torchscript_and_missing_projection(model, server, tmp_path):
    linear = torch.nn.Linear(512, 3)
    torch.jit.save(torch.jit.script(linear), str(tmp_path / "bd.pt"))
    projection = Projection.load(tmp_path / "bd.pt")
    assert projection.dims == 3
    async with running_server(model, projection=projection) as bd_server:
        async with connect(bd_server, path="/clap-bd") as ws:
            reply = await ask(ws, noise(seconds=0.5).tobytes())
    with torch.no_grad():
        expected = linear(torch.tensor([reply["embedding"]])).numpy()[0]
    np.testing.assert_allclose(reply["behavior_descriptor"], expected, atol=1e-5)
    async with connect(server, path="/clap-bd") as ws:  # no projection: the embedding, and how to get one
        bare = await ask(ws, noise(seconds=0.5).tobytes())
    assert bare["status"] == "OK" and bare["behavior_descriptor"] is None and bare["projection_version"] is None
    assert any("projection_fit" in w and "--projection" in w for w in bare["warnings"])


def test_bad_projection_files(tmp_path):
    from clap_ws.errors import ModelError

    np.savez(tmp_path / "wrong.npz", components=np.zeros((2, 100), "f4"))
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for name, words in (("wrong.npz", "d x 512"), ("empty.npz", "needs 'components'"),
                        ("junk.pt", "neither"), ("absent.npz", "does not exist")):
        with pytest.raises(ModelError, match=words):
            Projection.load(tmp_path / name)
