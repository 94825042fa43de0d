"""The model card's examples (Python, JavaScript, curl) run as written, each as its own
process, against a real gateway that needs a client key: only the base URL and the key are
substituted. The pinned model ids (routing and `GET /v1/models`) and `?dryRun=true` calling
no provider are covered in test_edits_sdk.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.helpers import fetch_image
from tests.integration.servers import ROOT, GatewayProcess

KEY = "card-example-key-5c1e8b2f7d"
JS_DIR = ROOT / "tests" / "js"
JS_INSTALL = "npm ci --prefix tests/js --no-audit --no-fund"
# A 300x200 source in the card's 1024x1024 box: factor min(1024/300, 1024/200) = 3.41..,
# so 300 -> 1024 and 200 -> 682.67, rounded half up (gateway/params.py, target_size).
SOURCE = (300, 200)
EXPECTED = (1024, 683)
TIMEOUT_S = 25

PYTHON_EXAMPLE = """\
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["GATEWAY_URL"], api_key=os.environ["GATEWAY_API_KEY"])

result = client.images.edit(
    model="recraft-crisp-upscale",
    image=open("source.png", "rb"),
    prompt="Upscale this image",
    size="1024x1024",
)
print(result.model_dump_json())
"""


@pytest.fixture(scope="module")
def keyed_gateway(
    tmp_path_factory: pytest.TempPathFactory, fal_emulator: Emulator, replicate_emulator: Emulator
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("card")
    process = start_gateway(
        workdir,
        fal_emulator,
        replicate_emulator,
        write_config(workdir / "g.yaml"),
        GATEWAY_API_KEYS=KEY,
    )
    yield process
    process.stop()


@pytest.fixture
def workdir(tmp_path: Path, emulators: tuple[Emulator, Emulator]) -> Path:
    """The directory an example runs in, holding the card's `source.png`."""
    (tmp_path / "source.png").write_bytes(make_image(*SOURCE))
    return tmp_path


def example_env(gateway: GatewayProcess) -> dict[str, str]:
    # A proxy or an OPENAI_* variable on the machine must not redirect the examples' calls.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("OPENAI_")
    }
    return {**env, "GATEWAY_URL": f"{gateway.url}/v1", "GATEWAY_API_KEY": KEY}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    try:
        body: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"{args[0]} printed no JSON:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return body


def assert_card_result(body: dict[str, Any], fal: Emulator) -> None:
    assert "error" not in body, body
    assert len(body["data"]) == 1 and body["size"] == "{}x{}".format(*EXPECTED)
    img, response = fetch_image(body["data"][0]["url"])  # signed: fetched without the key
    assert img.format == "PNG" and img.size == EXPECTED
    assert response.headers["content-type"] == "image/png"
    # The cheapest provider served it, and it really was called.
    assert body["metadata"]["provider"] == "fal" and body["metadata"]["providers"] == ["fal"]
    assert fal.requests(), "the example's request never reached the fal emulator"


def test_python_example(
    keyed_gateway: GatewayProcess, workdir: Path, emulators: tuple[Emulator, Emulator]
) -> None:
    script = workdir / "card_example.py"
    script.write_text(PYTHON_EXAMPLE)
    body = run([sys.executable, str(script)], workdir, example_env(keyed_gateway))
    assert_card_result(body, emulators[0])


def js_runtime() -> str:
    """node, with the pinned openai package installed; a clear failure otherwise."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the card's JavaScript example needs Node.js 20+")
    installed = JS_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists():
        pytest.fail(f"tests/js/node_modules is missing: run `{JS_INSTALL}` from the repository")
    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"]["openai"]
    version = json.loads(installed.read_text())["version"]
    if version != pinned:
        pytest.fail(f"tests/js has openai {version}, package.json pins {pinned}: `{JS_INSTALL}`")
    return node


def test_javascript_example(
    keyed_gateway: GatewayProcess, workdir: Path, emulators: tuple[Emulator, Emulator]
) -> None:
    node = js_runtime()
    # The script stays in tests/js, so `import "openai"` resolves to its node_modules, while
    # it runs in workdir, where the card's relative "source.png" is.
    body = run([node, str(JS_DIR / "card_example.mjs")], workdir, example_env(keyed_gateway))
    assert_card_result(body, emulators[0])


def curl(gateway: GatewayProcess, *auth: str) -> list[str]:
    """The card's curl command, with `-H "Authorization: Bearer $KEY"` when auth is given."""
    return [
        "curl",
        "-s",
        f"{gateway.url}/v1/images/edits",
        *auth,
        "-F",
        "model=recraft-crisp-upscale",
        "-F",
        "image=@source.png",
        "-F",
        "prompt=Upscale this image",
        "-F",
        "size=1024x1024",
    ]


def test_curl_example(
    keyed_gateway: GatewayProcess, workdir: Path, emulators: tuple[Emulator, Emulator]
) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is not on PATH: the card's curl example needs it")
    env = example_env(keyed_gateway)
    auth = ("-H", f"Authorization: Bearer {env['GATEWAY_API_KEY']}")
    assert_card_result(run(curl(keyed_gateway, *auth), workdir, env), emulators[0])
    # The key is what lets it through: the same command without it is OpenAI's 401.
    refused = run(curl(keyed_gateway), workdir, env)
    assert refused["error"]["code"] == "invalid_api_key", refused
