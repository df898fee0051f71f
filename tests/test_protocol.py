"""Message parsing and reply shapes, without a socket."""

import base64
import json
import re

import numpy as np
import pytest
from helpers import ROOT

from clap_ws.errors import ClapError, ErrorCode
from clap_ws.protocol import (
    EmbedRequest,
    InfoRequest,
    embedding_reply,
    error_reply,
    parse_binary,
    parse_query,
    parse_text,
)

DEFAULTS = parse_query("", 48000)
B64 = base64.b64encode(np.zeros(4, np.float32).tobytes()).decode()


def test_query_sample_rate_and_unknown_keys():
    d = parse_query("ckpt_dir=/models/x&sample_rate=44100&mfcc_focus=1&audio_sub_region=2", 48000)
    assert d.error is None and d.spec.sample_rate == 44100 and d.reply == "json"
    d = parse_query("sample_rate=16000&channels=2&normalize=peak&long_clip=head&reply=binary", 48000)
    assert (d.spec.sample_rate, d.spec.channels, d.spec.normalize, d.spec.long_clip, d.reply) == \
        (16000, 2, "peak", "head", "binary")
    assert parse_query("", 22050).spec.sample_rate == 22050


@pytest.mark.parametrize("query, code", [("sample_rate=abc", "bad_request"), ("sample_rate=1000", "bad_sample_rate"),
                                         ("channels=0", "bad_request"), ("reply=xml", "bad_request")])
def test_bad_query_is_reported_per_binary_frame(query, code):
    d = parse_query(query, 48000)
    with pytest.raises(ClapError) as info:
        parse_binary(b"\0\0\0\0", d)
    assert info.value.code == code


def test_json_embed_and_defaults():
    req = parse_text(json.dumps({"audio_buffer": B64, "sample_rate": 44100, "id": {"k": [1]}}), DEFAULTS, 8)
    assert isinstance(req, EmbedRequest) and req.buffers == [np.zeros(4, np.float32).tobytes()]
    assert req.spec.sample_rate == 44100 and req.id == {"k": [1]} and not req.batch
    req = parse_text(json.dumps({"audio_buffer": B64}), parse_query("sample_rate=16000", 48000), 8)
    assert req.spec.sample_rate == 16000  # falls back to the connection's rate
    req = parse_text(json.dumps({"op": "embed_batch", "audio_buffers": [B64, B64], "reply": "binary"}), DEFAULTS, 8)
    assert req.batch and len(req.buffers) == 2 and req.reply == "binary"
    assert isinstance(parse_text('{"op": "info", "id": 3}', DEFAULTS, 8), InfoRequest)


@pytest.mark.parametrize("message, code, words", [
    ("{", "bad_json", "not valid JSON"),
    ("[1, 2]", "bad_json", "JSON object"),
    ('"text"', "bad_json", "JSON object"),
    ("[" * 5000 + "]" * 5000, "bad_json", "not valid JSON"),
    ('{"op": "nope"}', "unknown_op", "unknown op 'nope'"),
    ('{"op": 5}', "unknown_op", "unknown op"),
    ('{"audio_buffer": "%%%", "sample_rate": 48000}', "bad_base64", "audio_buffer"),
    ('{"audio_buffer": "AAAA", "sample_rate": "48000"}', "bad_request", "sample_rate"),
    ('{"audio_buffer": "AAAA", "sample_rate": true}', "bad_request", "sample_rate"),
    ('{"audio_buffer": 12}', "bad_request", "audio_buffer"),
    ('{"sample_rate": 48000}', "bad_request", "audio_buffer: Field required"),
    ('{"audio_buffer": "AAAA", "colour": "red"}', "bad_request", "colour: unknown field"),
    ('{"audio_buffer": "AAAA", "channels": 0}', "bad_request", "channels"),
    ('{"audio_buffer": "AAAA", "sample_rate": 1e400}', "bad_json", "not valid JSON"),
    ('{"audio_buffer": "AAAA", "sample_rate": 5}', "bad_sample_rate", "out of range"),
    ('{"op": "embed_batch", "audio_buffers": []}', "bad_request", "audio_buffers"),
    ('{"op": "embed_batch", "audio_buffers": ["AAAA", "!"]}', "bad_base64", "audio_buffers[1]"),
    ('{"op": "embed_batch", "audio_buffers": ["AAAA", "AAAA", "AAAA"]}', "too_many_items", "at most 2"),
    ('{"op": "info", "extra": 1}', "bad_request", "extra: unknown field"),
])
def test_bad_messages_get_codes_and_reasons(message, code, words):
    with pytest.raises(ClapError) as info:
        parse_text(message, DEFAULTS, 2)
    assert info.value.code == code
    assert words in info.value.message


def test_errors_echo_the_id_when_one_can_be_read():
    with pytest.raises(ClapError) as info:
        parse_text('{"audio_buffer": "AAAA", "bogus": 1, "id": "req-9"}', DEFAULTS, 2)
    reply = json.loads(error_reply(info.value))
    assert reply == {"status": "ERROR", "id": "req-9",
                     "error": {"code": "bad_request", "message": "bogus: unknown field"}}


def test_embedding_reply_shapes():
    emb = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    one = parse_text(json.dumps({"audio_buffer": "", "id": 4}), DEFAULTS, 8)
    body, text = embedding_reply(one, emb[:1], model="untrained", seconds=0.01, queue_ms=1, model_ms=5)
    reply = json.loads(body)
    assert text and reply["status"] == "OK" and reply["type"] == "clap" and reply["model"] == "untrained"
    assert reply["embedding"] == reply["features"] and len(reply["embedding"]) == 512
    np.testing.assert_allclose(reply["embedding"], emb[0], rtol=1e-6)
    assert reply["id"] == 4 and reply["extraction_time_ms"] == pytest.approx(10)
    batch = parse_text(json.dumps({"op": "embed_batch", "audio_buffers": ["", ""]}), DEFAULTS, 8)
    assert json.loads(embedding_reply(batch, emb, model="m", seconds=0, queue_ms=0, model_ms=0)[0])["count"] == 2
    raw, text = embedding_reply(parse_binary(b"", parse_query("reply=binary", 48000)), emb[:1], model="m",
                                seconds=0, queue_ms=0, model_ms=0)
    assert not text and np.array_equal(np.frombuffer(raw, "<f4"), emb[0])


def test_protocol_md_lists_exactly_the_error_codes():
    text = (ROOT / "PROTOCOL.md").read_text()
    table = text[text.index("### Errors"):text.index("## Audio handling")]
    listed = {code for row in re.findall(r"^\| (`[a-z0-9_]+`(?: / `[a-z0-9_]+`)*) \|", table, re.M)
              for code in re.findall(r"`([a-z0-9_]+)`", row)}
    assert listed == {code.value for code in ErrorCode}


def test_one_registry_every_op_one_model_and_one_handler(model):
    """An op is its request model (protocol.OPS, from the model's ``op`` Literal) and one handler (Service.registry):
    neither can be added without the other, and the HTTP search parameters are the WebSocket search's own."""
    from clap_ws.http import HttpSearch, HttpSimilar
    from clap_ws.protocol import OPS, SearchParams, SearchRequest
    from clap_ws.service import Service

    service = Service(model, warm_up=False)
    try:
        assert set(service.registry) == set(OPS)
        for op, (request_model, handler) in service.registry.items():
            assert request_model is OPS[op] and op in request_model.ops() and callable(handler)
    finally:
        service.close()
    assert issubclass(SearchRequest, SearchParams) and issubclass(HttpSearch, SearchParams)
    assert issubclass(HttpSimilar, SearchParams)
    assert set(OPS) == {"embed", "embed_batch", "embed_text", "search", "libraries", "archive_add", "novelty",
                        "archive_search", "archive_info", "archive_drop", "projection_fit", "projection_info", "info"}
