"""/docs (Swagger UI) and /redoc in headless Chromium, offline: every request the pages make
is routed through the test, which lets loopback through and refuses (and reports) anything
else. And /openapi.json is a valid OpenAPI 3.1 document."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from openapi_spec_validator import validate
from playwright.sync_api import Browser, Page, Route, expect

from tests.integration.browser import is_loopback
from tests.integration.conftest import write_config
from tests.integration.servers import GatewayProcess


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("docs")
    process = GatewayProcess(
        {"GATEWAY_CONFIG": str(write_config(workdir / "g.yaml"))}, workdir, ("--sandbox",)
    ).start()
    yield process
    process.stop()


def swagger_rendered(page: Page) -> None:
    operation = page.locator('.opblock-summary-path[data-path="/v1/images/edits"]')
    expect(operation.first).to_be_visible()
    expect(operation.first).to_have_text("/v1/images/edits")


def redoc_rendered(page: Page) -> None:
    expect(page.locator("h1").first).to_contain_text("upscale-gateway")
    expect(page.get_by_text("/v1/images/edits").first).to_be_attached()


class LeftLoopback(AssertionError):
    """A page asked for something off the host (kept apart from a page that did not render,
    which is a plain failure even where leaving loopback is a known defect)."""


@pytest.mark.parametrize(
    ("path", "rendered"),
    [("/docs", swagger_rendered), ("/redoc", redoc_rendered)],
)
def test_docs_render_without_leaving_loopback(
    browser: Browser, sandbox: GatewayProcess, path: str, rendered: Callable[[Page], None]
) -> None:
    context = browser.new_context()
    allowed: list[str] = []
    refused: list[str] = []
    errors: list[str] = []

    def gate(route: Route) -> None:
        url = route.request.url
        if is_loopback(url):
            allowed.append(url)
            route.continue_()
        else:
            refused.append(url)
            route.abort("blockedbyclient")

    context.route("**/*", gate)
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{sandbox.url}{path}")
        rendered(page)
        page.wait_for_load_state("networkidle")  # late requests (fonts, validators) too
    finally:
        context.close()
    assert f"{sandbox.url}/openapi.json" in allowed, allowed  # it read the live document
    assert any("/static/vendor/" in u for u in allowed), allowed  # the package's own assets
    assert not errors, errors
    if refused:
        raise LeftLoopback(f"{path} tried to leave loopback: {refused}")


def test_openapi_document_is_valid_3_1(sandbox: GatewayProcess) -> None:
    spec = httpx.get(f"{sandbox.url}/openapi.json", timeout=10).json()
    assert re.fullmatch(r"3\.1\.\d+", spec["openapi"]), spec["openapi"]
    validate(spec)  # picks the 3.1 validator from the document's own version
    assert spec["info"]["title"] == "upscale-gateway"
    assert "post" in spec["paths"]["/v1/images/edits"]
