"""GET /playground in headless Chromium, against a sandbox gateway that requires a client
key: the page asks for the key on the 401, then upscales through the public API and shows
the output at its exact size with who served it and what it cost. Every request the page
makes stays on loopback. The screenshot is kept ($TEST_ARTIFACTS/playground.png)."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, Page, expect

from tests.integration.browser import artifact, is_loopback
from tests.integration.conftest import write_config
from tests.integration.servers import GatewayProcess

KEY = "playground-key-4c1d"
BY = "\u00d7"  # the page writes sizes with a multiplication sign
NONE = "\u2013"  # and a figure not known yet as an en dash


def picture(width: int, height: int) -> bytes:
    """A small PNG with edges and colour, so the before/after comparison shows something."""
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((6, 6, width // 2, height - 6), fill=(230, 80, 40), outline=(20, 20, 20))
    draw.rectangle((width // 2 + 4, 8, width - 8, height // 2), fill=(40, 110, 220))
    draw.line((0, height - 1, width - 1, 0), fill=(250, 250, 250), width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("playground")
    config = write_config(workdir / "g.yaml", sandbox={"latency_ms": 40, "jitter_ms": 10})
    process = GatewayProcess(
        {"GATEWAY_CONFIG": str(config), "GATEWAY_API_KEYS": KEY}, workdir, ("--sandbox",)
    ).start()
    yield process
    process.stop()


class Recorded:
    """A page, with every request it made and every script error it raised."""

    def __init__(self, browser: Browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        response = self.page.goto(url)
        assert response is not None and response.ok
        self.policy = response.headers.get("content-security-policy", "")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors
        assert self.requests, "no request was recorded"
        away = [u for u in self.requests if not is_loopback(u)]
        assert not away, f"the page left loopback: {away}"


@pytest.fixture
def recorded(browser: Browser, sandbox: GatewayProcess) -> Iterator[Recorded]:
    tab = Recorded(browser, f"{sandbox.url}/playground")
    yield tab
    tab.close()


def drop_file(page: Page, name: str, mime: str, data: bytes) -> None:
    """What a drag-and-drop from the desktop delivers: a drop event holding the file."""
    transfer = page.evaluate_handle(
        """([name, mime, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            return dt;
        }""",
        [name, mime, base64.b64encode(data).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def natural_size(page: Page, selector: str) -> list[int]:
    size: list[int] = page.eval_on_selector(selector, "i => [i.naturalWidth, i.naturalHeight]")
    return size


def test_playground_asks_for_the_key_then_upscales_exactly(
    recorded: Recorded, sandbox: GatewayProcess
) -> None:
    page = recorded.page
    # The browser itself keeps the page's key and images on this origin.
    assert "connect-src 'self'" in recorded.policy and "default-src 'none'" in recorded.policy
    expect(page.locator("#run")).to_be_disabled()  # nothing to send yet
    page.set_input_files(
        "#file", files=[{"name": "shapes.png", "mimeType": "image/png", "buffer": picture(64, 48)}]
    )
    expect(page.locator("#in-size")).to_have_text(f"64{BY}48")
    page.check("#by-scale")
    page.fill("#scale", "2")
    expect(page.locator("#expect")).to_have_text(f"\u2192 128{BY}96")

    page.click("#run")  # no key: the gateway's 401 becomes a prompt for one
    expect(page.locator("body")).to_have_attribute("data-state", "needs-key")
    prompt = page.locator("#key-prompt")
    expect(prompt).to_be_visible()
    expect(prompt).to_contain_text("needs an API key")
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("document.activeElement.id") == "key"

    page.fill("#key", KEY)
    page.click("#run")
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    expect(prompt).to_be_hidden()
    assert natural_size(page, "#output") == [128, 96]
    expect(page.locator("#out-size")).to_have_text(f"128{BY}96")
    provider = page.inner_text("#provider")
    assert provider in ("fal", "replicate")
    expect(page.locator("#cost")).to_have_text(re.compile(r"^\$0\.\d{3,6}$"))
    expect(page.locator("#attempts")).to_have_text(f"{provider}=ok")
    expect(page.locator("#cache")).to_have_text("bypass")  # the test config turns it off
    expect(page.locator("#elapsed")).to_have_text(re.compile(r"^\d+ ms$"))
    # b64_json (the default) is shown from an object URL of the page's own.
    assert page.get_attribute("#output", "src", timeout=1000).startswith("blob:")
    # The key stays in this tab: sessionStorage, never localStorage.
    assert page.evaluate(f"sessionStorage.getItem('upscale-gateway.api-key') === '{KEY}'")
    assert page.evaluate("localStorage.length") == 0

    page.fill("#slider", "35")  # the output over the input, cut at 35 %
    shot: Path = artifact("playground.png")
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, len(data)
    with Image.open(shot) as img:
        assert img.size[0] == 1280
    print(f"playground screenshot: {shot}")


def test_playground_takes_a_dropped_file_and_shows_api_errors(
    recorded: Recorded, sandbox: GatewayProcess
) -> None:
    page = recorded.page
    page.fill("#key", KEY)
    drop_file(page, "dropped.png", "image/png", picture(64, 48))
    expect(page.locator("#file-name")).to_contain_text("dropped.png")
    page.check("#by-size")
    page.fill("#size", "100x100")  # 64x48 fits as 100x75
    page.select_option("#format", "webp")
    expect(page.locator("#compression")).to_be_enabled()
    page.fill("#compression", "80")
    page.select_option("#provider-pref", "replicate")  # sent as provider[only][]=replicate
    page.select_option("#response-format", "url")
    page.click("#run")
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    assert natural_size(page, "#output") == [100, 75]
    expect(page.locator("#provider")).to_have_text("replicate")
    src = page.get_attribute("#output", "src") or ""
    assert src.startswith(f"{sandbox.url}/v1/files/"), src  # the gateway's signed URL

    # Not an image: the API's own error message is shown, with its status and field.
    drop_file(page, "notes.png", "image/png", b"these are not pixels\n" * 10)
    page.click("#run")
    expect(page.locator("body")).to_have_attribute("data-state", "error")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(re.compile(r"\b4\d\d\b"))
    expect(error).to_contain_text("image")
    expect(page.locator("#output")).not_to_have_attribute("src", re.compile("."))
    expect(page.locator("#provider")).to_have_text(NONE)
