"""The HTTP side of the port (the page's files, the JSON API, audio with ranges) and the search op's new abilities.

Real servers on 127.0.0.1 with a library built from real files in several folders.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import time
import urllib.error
import urllib.request

import pytest
import soundfile as sf
from helpers import ask, connect, running_server, tone

from clap_ws.build import build
from clap_ws.errors import ErrorCode
from clap_ws.search.library import Library

PAGE_BUDGET = 300 * 1024  # the page's first load, all from the server


@pytest.fixture
async def web(model, library_file):
    async with running_server(model, libraries=[Library.load(library_file)], warm_up=False) as server:
        yield server


def fetch(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def get(server, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return await asyncio.to_thread(fetch, server.port, path, headers)


async def get_json(server, path: str, headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = await get(server, path, headers)
    return status, json.loads(body)


def raw_get(port: int, target: str) -> bytes:
    """A request line sent as written: no client library normalises ``..`` or encodes anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


# ---- the page ------------------------------------------------------------------------------------
async def test_page_and_its_files_come_from_the_server_within_budget(web):
    status, headers, html = await get(web, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    total = len(html)
    for name in ("app.js", "style.css", "clap-ws-client.js", "favicon.svg"):
        status, headers, body = await get(web, f"/static/{name}")
        assert status == 200 and body, name
        total += len(body)
    assert b"export class ClapClient" in (await get(web, "/static/clap-ws-client.js"))[2]  # the project's client
    assert total < PAGE_BUDGET
    for text in (html, (await get(web, "/static/app.js"))[2]):
        assert b"http://" not in text and b"https://" not in text  # nothing from another origin
    assert (await get(web, "/static/nope.js"))[0] == 404
    assert (await get(web, "/static/..%2Fserver.py"))[0] == 404


async def test_websocket_clients_on_the_root_path_still_get_embeddings(web):
    async with connect(web, path="/") as ws:
        reply = await ask(ws, tone(seconds=0.5).tobytes())
    assert reply["status"] == "OK" and len(reply["features"]) == 512


# ---- the JSON API --------------------------------------------------------------------------------
async def test_http_search_returns_scored_results_with_everything_the_library_stores(web, library_file):
    lib = Library.load(library_file)
    status, body = await get_json(web, "/api/search?text=a+soft+pad&top_k=4")
    assert status == 200 and body["count"] == 4 and body["more"] and body["model"] == "untrained"
    first = body["results"][0]
    assert set(first) == {"id", "library", "path", "score", "tags", "duration", "sample_rate", "channels",
                          "preview_url"}
    assert first["path"] == lib.items[first["id"]]["path"] and first["preview_url"] == f"/audio/sounds/{first['id']}"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    async with connect(web) as ws:  # the same ranking as the WebSocket op
        same = await ask(ws, {"op": "search", "text": "a soft pad", "top_k": 4})
    assert [m["id"] for m in same["matches"]] == [r["id"] for r in body["results"]]
    # pages: offset continues where the last page ended
    _, page2 = await get_json(web, "/api/search?text=a+soft+pad&top_k=4&offset=4")
    _, whole = await get_json(web, "/api/search?text=a+soft+pad&top_k=8")
    assert [r["id"] for r in body["results"] + page2["results"]] == [r["id"] for r in whole["results"]]
    _, last = await get_json(web, "/api/search?text=a+soft+pad&top_k=4&offset=8")
    assert last["count"] == 1 and not last["more"]


async def test_http_filters_tags_any_case_durations_min_score_and_browse(web):
    _, kicks = await get_json(web, "/api/search?text=boom&tags=KICKS")
    assert sorted(r["path"] for r in kicks["results"]) == [f"drums/kicks/kick{i}.wav" for i in range(3)]
    _, both = await get_json(web, "/api/search?tags=drums,kicks&tags=Drums")
    assert both["count"] == 3 and all(r["score"] is None for r in both["results"])  # no text: browse
    assert [r["path"] for r in both["results"]] == sorted(r["path"] for r in both["results"])
    status, unknown = await get_json(web, "/api/search?text=boom&tags=snares")
    assert status == 400 and unknown["error"]["code"] == ErrorCode.UNKNOWN_TAG
    assert "snares" in unknown["error"]["message"]
    _, short = await get_json(web, "/api/search?max_duration=1.0")
    assert short["count"] == 9 and all(r["duration"] <= 1.0 for r in short["results"])
    _, none = await get_json(web, "/api/search?min_duration=1.5")
    assert none["count"] == 0 and not none["more"]
    _, top = await get_json(web, "/api/search?text=boom&top_k=9")
    cut = top["results"][2]["score"]
    _, above = await get_json(web, f"/api/search?text=boom&top_k=9&min_score={cut}")
    assert [r["id"] for r in above["results"]] == [r["id"] for r in top["results"][:3]]


@pytest.mark.parametrize("query, words", [
    ("top_k=0", "top_k"), ("top_k=151", "top_k"), ("top_k=x", "top_k"), ("offset=-1", "offset"),
    ("min_score=2", "min_score"), ("min_duration=3&max_duration=1", "larger than"),
    ("colour=red", "unknown query key 'colour'"), ("text=a&text=b", "more than once"),
])
async def test_http_search_bad_queries_say_what_is_wrong(web, query, words):
    status, body = await get_json(web, f"/api/search?{query}")
    assert status == 400 and body["status"] == "ERROR" and body["error"]["code"] == ErrorCode.BAD_REQUEST
    assert words in body["error"]["message"] and set(body) == {"status", "error", "id"}


async def test_more_like_this_leaves_the_item_out_over_http_and_websocket(web, library_file):
    lib = Library.load(library_file)
    kick = next(i for i, it in enumerate(lib.items) if it["path"] == "drums/kicks/kick1.wav")
    status, body = await get_json(web, f"/api/similar?library=sounds&id={kick}&top_k=8")
    assert status == 200 and body["count"] == 8 and kick not in [r["id"] for r in body["results"]]
    expected = sorted((float(v @ lib.embeddings[kick]), i) for i, v in enumerate(lib.embeddings) if i != kick)[::-1]
    assert [r["id"] for r in body["results"]] == [i for _, i in expected[:8]]
    _, tagged = await get_json(web, f"/api/similar?library=sounds&id={kick}&tags=kicks")
    assert tagged["count"] == 2 and all("kicks" in r["tags"] for r in tagged["results"])
    async with connect(web) as ws:
        over_ws = await ask(ws, {"op": "search", "item": {"library": "sounds", "id": kick}, "top_k": 8})
        blended = await ask(ws, {"op": "search", "item": {"library": "sounds", "id": kick}, "text": "boom",
                                 "alpha": 0.5, "top_k": 3})
        missing = await ask(ws, {"op": "search", "item": {"library": "sounds", "id": 99}})
        other = await ask(ws, {"op": "search", "item": {"library": "nope", "id": 0}})
        two = await ask(ws, {"op": "search", "item": {"library": "sounds", "id": 0}, "embedding": [0.1] * 512})
        libraries = await ask(ws, {"op": "libraries", "id": "l"})
    assert [m["id"] for m in over_ws["matches"]] == [r["id"] for r in body["results"]]
    assert blended["status"] == "OK" and kick not in [m["id"] for m in blended["matches"]]
    assert missing["error"]["code"] == ErrorCode.NOT_FOUND and other["error"]["code"] == ErrorCode.UNKNOWN_LIBRARY
    assert two["error"]["code"] == ErrorCode.BAD_REQUEST
    assert libraries["id"] == "l" and libraries["libraries"][0]["tags"] == {"pads": 4, "drums": 3, "kicks": 3}
    for path in (f"/api/similar?library=sounds&id={len(lib)}", "/api/similar?library=nope&id=0"):
        status, error = await get_json(web, path)
        assert status == 404 and error["error"]["code"] in (ErrorCode.NOT_FOUND, ErrorCode.UNKNOWN_LIBRARY)
    assert (await get_json(web, "/api/similar?library=sounds"))[0] == 400


async def test_libraries_and_info(web):
    status, body = await get_json(web, "/api/libraries")
    (lib,) = body["libraries"]
    assert status == 200 and lib["name"] == "sounds" and lib["count"] == 9 and lib["model"] == "untrained"
    assert lib["tags"] == {"pads": 4, "drums": 3, "kicks": 3} and lib["duration"] == [1.0, 1.0]
    status, info = await get_json(web, "/api/info")
    assert status == 200 and info["untrained"] and info["libraries"][0]["count"] == 9 and "recent" in info
    assert (await get_json(web, "/api/info?x=1"))[0] == 400
    status, body = await get_json(web, "/api/nothing")
    assert status == 404 and body["error"]["code"] == ErrorCode.NOT_FOUND


# ---- audio ---------------------------------------------------------------------------------------
async def test_audio_whole_and_ranges(web, folder, library_file):
    lib = Library.load(library_file)
    wav = next(i for i, it in enumerate(lib.items) if it["path"].endswith("kick0.wav"))
    data = (folder / "drums" / "kicks" / "kick0.wav").read_bytes()
    status, headers, body = await get(web, f"/audio/sounds/{wav}")
    assert status == 200 and body == data and headers["Content-Type"] == "audio/wav"
    assert headers["Accept-Ranges"] == "bytes"
    status, headers, body = await get(web, f"/audio/sounds/{wav}", {"Range": "bytes=10-109"})
    assert status == 206 and body == data[10:110] and headers["Content-Range"] == f"bytes 10-109/{len(data)}"
    status, _, body = await get(web, f"/audio/sounds/{wav}", {"Range": "bytes=-16"})
    assert status == 206 and body == data[-16:]
    status, _, body = await get(web, f"/audio/sounds/{wav}", {"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    status, headers, _ = await get(web, f"/audio/sounds/{wav}", {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    flac = next(i for i, it in enumerate(lib.items) if it["path"].endswith(".flac"))
    assert (await get(web, f"/audio/sounds/{flac}"))[1]["Content-Type"] == "audio/flac"
    status, body = await get_json(web, f"/api/waveform/sounds/{wav}")
    assert status == 200 and len(body["peaks"]) == 96 and body["peaks"][0] > body["peaks"][-1]  # a decaying kick


@pytest.mark.parametrize("target", [
    "/audio/sounds/../../../etc/passwd", "/audio/..%2F..%2F..%2Fetc%2Fpasswd/0", "/audio/%2Fetc%2Fpasswd/0",
    "/audio/sounds/-1", "/audio/sounds/99999", "/audio/sounds/1e3", "/audio/sounds/0/../../x", "/audio/nope/0",
    "/audio/sounds/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/audio/sounds", "/audio/sounds/0%00", "/audio/sounds/%D9%A3",
])
async def test_audio_paths_never_reach_outside_the_library(web, target):
    answer = await asyncio.to_thread(raw_get, web.port, target)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and b"root:" not in body
    assert json.loads(body)["error"]["code"] in (ErrorCode.NOT_FOUND, ErrorCode.UNKNOWN_LIBRARY)


async def test_a_file_gone_from_disk_is_404_and_an_edited_library_cannot_point_outside(model, folder, tmp_path):
    root = tmp_path / "lib"
    shutil.copytree(folder, root)
    out = tmp_path / "lib.npz"
    build(model, root, out, batch=4, progress=False)
    lib = Library.load(out)
    lib.items[0] = {**lib.items[0], "path": "../../etc/passwd"}  # a library file edited by hand
    gone = next(i for i, it in enumerate(lib.items) if it["path"] == "noise.mp3")
    (root / "noise.mp3").unlink()
    async with running_server(model, libraries=[lib], warm_up=False) as server:
        status, body = await get_json(server, "/audio/lib/0")
        assert status == 404 and "outside" in body["error"]["message"]
        status, body = await get_json(server, f"/audio/lib/{gone}")
        assert status == 404 and "gone" in body["error"]["message"]


# ---- access -----------------------------------------------------------------------------------
async def test_token_guards_the_api_and_audio_but_not_the_page_or_health(model, library_file):
    async with running_server(model, libraries=[Library.load(library_file)], warm_up=False, token="s3cret") as srv:
        status, headers, body = await get(srv, "/api/info")
        assert status == 401 and json.loads(body)["error"]["code"] == ErrorCode.UNAUTHORIZED
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await get(srv, "/api/info", {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await get(srv, "/api/info", {"Authorization": "Bearer s3cret"}))[0] == 200
        assert (await get(srv, "/audio/sounds/0?token=s3cret"))[0] == 200
        assert (await get(srv, "/audio/sounds/0"))[0] == 401
        assert (await get(srv, "/api/search?text=x&token=s3cret"))[0] == 200
        assert (await get(srv, "/"))[0] == 200 and (await get(srv, "/health"))[0] == 200


async def test_origin_rule_applies_to_the_api(model, library_file):
    async with running_server(model, libraries=[Library.load(library_file)], warm_up=False,
                              allowed_origins=("https://friend.example",)) as srv:
        status, _, body = await get(srv, "/api/libraries", {"Origin": "https://evil.example"})
        assert status == 403 and json.loads(body)["error"]["code"] == ErrorCode.FORBIDDEN
        status, headers, _ = await get(srv, "/api/libraries", {"Origin": "https://friend.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://friend.example"
        own = f"http://127.0.0.1:{srv.port}"
        status, headers, _ = await get(srv, "/api/libraries", {"Origin": own})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
        request = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/info", method="POST", data=b"")
        try:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
            raise AssertionError("POST was accepted")
        except urllib.error.HTTPError as e:
            assert e.code in (400, 405)  # websockets itself may refuse a body first


async def test_without_a_library_the_api_says_how_to_get_one(model):
    async with running_server(model, warm_up=False) as srv:
        status, body = await get_json(srv, "/api/search?text=x")
        assert status == 404 and body["error"]["code"] == ErrorCode.NO_LIBRARY
        assert "--library" in body["error"]["message"]
        assert (await get(srv, "/"))[0] == 200


# ---- a library rebuilt while serving ---------------------------------------------------------------
async def test_a_rebuilt_library_is_picked_up_and_a_broken_one_keeps_the_old(model, folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "lib"
    shutil.copytree(folder, root)
    out = tmp_path / "lib.npz"
    build(model, root, out, batch=4, progress=False)
    async with running_server(model, libraries=[Library.load(out)], warm_up=False, library_poll_s=0.2) as srv:
        assert "library 'lib': 9 items, flat index" in caplog.text
        (root / "noise.mp3").unlink()
        sf.write(root / "pads" / "new1.wav", tone(330, sr=16000, seconds=1), 16000)
        sf.write(root / "pads" / "new2.wav", tone(660, sr=16000, seconds=1), 16000)
        await asyncio.to_thread(build, model, root, out, batch=4, progress=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and srv.service.libraries["lib"].items.__len__() != 10:
            await asyncio.sleep(0.1)
        _, body = await get_json(srv, "/api/search?top_k=20")
        paths = [r["path"] for r in body["results"]]
        assert "noise.mp3" not in paths and "pads/new1.wav" in paths and body["count"] == 10
        out.write_bytes(b"not a library")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "cannot be loaded" not in caplog.text:
            await asyncio.sleep(0.1)
        assert "cannot be loaded (still serving the old one, 10 items)" in caplog.text
        assert (await get_json(srv, "/api/search?top_k=20"))[1]["count"] == 10


def test_byte_ranges():
    from clap_ws.http import parse_range

    assert parse_range(None, 100) is None and parse_range("bytes=0-0", 100).stop == 1
    assert parse_range("bytes=5-1000", 100).stop == 100 and parse_range("items=1-2", 100) is None
    for bad in ("bytes=-0", "bytes=-", "bytes=100-", "bytes=50-10"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)
    assert parse_range("bytes=-30", 100).start == 70 and parse_range("bytes=-300", 100).start == 0
