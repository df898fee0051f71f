"""The search page in a real headless Chromium (Debian's, driven by Playwright) against a real server.

Screenshots go to ``tests/artifacts/`` (not committed). ``scripts/test.sh`` installs Chromium when it is
missing; elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import running_server

from clap_ws.search.library import Library

CHROMIUM = os.environ.get("CLAP_WS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = 30_000
REQUIRED = os.environ.get("CLAP_WS_REQUIRE_BROWSER") == "1"  # scripts/test.sh: a missing browser is a failure
pytestmark = pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                                reason="needs Chromium (apt-get install chromium; scripts/test.sh installs it)")
# As this machine's probe ran it: no first-run, sync or background traffic (the network is closed anyway).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Page:
    """A tab on the server's page that records every request it makes and every script error."""

    def __init__(self, tab, port: int):
        self.tab, self.port = tab, port
        self.requests: list[str] = []
        self.errors: list[str] = []
        tab.on("request", lambda r: self.requests.append(r.url))
        tab.on("pageerror", lambda e: self.errors.append(str(e)))
        tab.on("websocket", lambda ws: self.requests.append(ws.url))

    @classmethod
    async def open(cls, browser, server, query: str = "") -> Page:
        page = cls(await browser.new_page(viewport={"width": 1280, "height": 900}), server.port)
        await page.tab.goto(f"http://127.0.0.1:{server.port}/{query}")
        return page

    async def names(self) -> list[str]:
        return await self.tab.locator(".result .name").all_inner_texts()

    async def settled(self) -> str:
        """The status line once the search in flight has answered."""
        status = self.tab.locator("#status")
        await self.tab.wait_for_function(
            "() => !/Searching|Loading|Decoding/.test(document.getElementById('status').textContent)",
            timeout=WAIT_MS)
        return await status.inner_text()

    def foreign(self) -> list[str]:
        own = {f"127.0.0.1:{self.port}"}
        return [u for u in self.requests if urlsplit(u).netloc not in own and not u.startswith(("data:", "blob:"))]

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_search_listen_more_like_this_and_filter(model, library_file, browser):
    async with running_server(model, libraries=[Library.load(library_file)], warm_up=False) as server:
        page = await Page.open(browser, server)
        await page.tab.wait_for_selector(".result", timeout=WAIT_MS)
        assert await page.tab.locator("#untrained").is_visible()  # random weights say so
        assert "(browsing)" in await page.settled() and len(await page.names()) == 9

        await page.tab.fill("#text", "a soft pad")
        await page.tab.press("#text", "Enter")
        assert "sounds" in await page.settled()
        assert "q=a+soft+pad" in page.tab.url  # the query lives in the URL
        scores = await page.tab.locator(".result .score span").all_inner_texts()
        assert len(scores) == 9 and [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)

        kick = page.tab.locator(".result", has_text="kick0.wav").locator(".play")
        await kick.click()  # listen
        await page.tab.wait_for_function("() => { const a = document.getElementById('player');"
                                         " return a.readyState >= 1 && a.duration > 0 && !a.error; }", timeout=WAIT_MS)
        assert await page.tab.locator(".result.playing").count() == 1
        await kick.click()  # and stop
        assert await page.tab.evaluate("document.getElementById('player').paused")

        first = (await page.names())[0]
        await page.tab.locator(".result .similar").first.click()  # more like this
        status = await page.settled()
        assert "like" in status and first not in await page.names() and len(await page.names()) == 8
        assert re.search(r"like=sounds%2F\d+", page.tab.url)

        await page.tab.locator(".tag", has_text="kicks").click()  # a tag chip narrows the results
        await page.settled()
        metas = await page.tab.locator(".result .meta").all_inner_texts()
        assert metas and all("kicks" in m for m in metas)
        await page.shot("search-page")
        assert page.errors == [] and page.foreign() == []


async def test_search_by_a_picked_file_and_keyboard(model, library_file, folder, browser):
    async with running_server(model, libraries=[Library.load(library_file)], warm_up=False) as server:
        page = await Page.open(browser, server, "?q=boom")  # a bookmarked search
        await page.tab.wait_for_selector(".result", timeout=WAIT_MS)
        assert await page.tab.input_value("#text") == "boom"

        await page.tab.set_input_files("#file", str(folder / "pads" / "pad1.flac"))
        await page.tab.wait_for_function("() => document.getElementById('sound-name').textContent.includes('pad1')",
                                         timeout=WAIT_MS)
        await page.settled()
        assert await page.tab.locator("#blend").is_visible()  # text and a sound: the slider blends them
        await page.tab.locator("#clear-sound").click()
        await page.tab.fill("#text", "")
        await page.tab.set_input_files("#file", str(folder / "pads" / "pad1.flac"))
        await page.tab.wait_for_function("() => document.getElementById('sound-name').textContent.includes('pad1')",
                                         timeout=WAIT_MS)
        await page.settled()
        assert (await page.names())[0] == "pad1.flac"  # the sound itself ranks first
        await page.tab.set_input_files("#file", str(folder / "notes.txt"))  # not audio
        await page.tab.wait_for_function("() => document.getElementById('status').textContent.includes('decode')",
                                         timeout=WAIT_MS)

        await page.tab.locator("body").click(position={"x": 5, "y": 5})
        await page.tab.keyboard.press("ArrowDown")
        await page.tab.keyboard.press("ArrowDown")
        selected = await page.tab.locator(".result.selected .name").inner_text()
        assert selected == (await page.names())[1]
        await page.tab.keyboard.press(" ")
        await page.tab.wait_for_function("() => !document.getElementById('player').paused", timeout=WAIT_MS)
        await page.tab.keyboard.press(" ")
        assert await page.tab.evaluate("document.getElementById('player').paused")
        await page.tab.keyboard.press("Enter")
        assert "like" in await page.settled() and selected not in await page.names()
        assert page.errors == [] and page.foreign() == []


async def test_token_is_asked_for_and_a_wrong_one_is_refused_clearly(model, library_file, browser):
    async with running_server(model, libraries=[Library.load(library_file)], warm_up=False, token="s3cret") as server:
        page = await Page.open(browser, server)
        await page.tab.wait_for_selector("#token", state="visible", timeout=WAIT_MS)
        await page.tab.fill("#token", "wrong")
        await page.tab.press("#token", "Enter")
        await page.tab.wait_for_function("() => document.getElementById('token-message').textContent"
                                         ".includes('refused')", timeout=WAIT_MS)
        await page.tab.fill("#token", "s3cret")
        await page.tab.press("#token", "Enter")
        await page.tab.wait_for_selector(".result", timeout=WAIT_MS)
        await page.tab.locator(".result", has_text="kick0.wav").locator(".play").click()  # audio carries the token
        await page.tab.wait_for_function("() => document.getElementById('player').duration > 0", timeout=WAIT_MS)
        other = await Page.open(browser, server, "?token=s3cret")  # or takes it from the URL
        await other.tab.wait_for_selector(".result", timeout=WAIT_MS)
        assert page.errors == [] and other.errors == []


async def test_no_library_says_how_to_build_one(model, browser):
    async with running_server(model, warm_up=False) as server:
        page = await Page.open(browser, server)
        await page.tab.wait_for_function("() => document.getElementById('status').textContent"
                                         ".includes('library build')", timeout=WAIT_MS)
        assert page.errors == []
