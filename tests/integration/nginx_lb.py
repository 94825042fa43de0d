"""The repo's load balancer, deploy/nginx.conf, run by Debian's nginx in front of local ports.

The config is the one compose runs; only its upstream servers (gateway-1:8080 ...) and its
listen address are swapped for local ones (`render`), and every path in it is relative to the
prefix nginx is given, so it runs as any user from a temporary directory:

    with NginxLB([gw1.port, gw2.port, gw3.port]) as lb:
        httpx.get(f"{lb.url}/healthz")

`Backend` is a stand-in replica for tests of the balancer itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.integration.servers import ROOT, free_port

CONF = ROOT / "deploy" / "nginx.conf"
# Debian installs it in /usr/sbin, which a non-root PATH may lack.
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
_UPSTREAM = re.compile(r"^([ \t]*)upstream gateways \{\n(.*?)^\1\}", re.M | re.S)
_SERVER = re.compile(r"^([ \t]*)server (\S+)((?: [^;\n]+)?);$", re.M)
_LISTEN = re.compile(r"^([ \t]*)listen (\S+);$", re.M)


def upstream_servers(text: str) -> list[tuple[str, str]]:
    """(address, parameters) of each server in the `upstream gateways` block."""
    block = _UPSTREAM.search(text)
    assert block, "deploy/nginx.conf has no `upstream gateways` block"
    return [(m[2], m[3].strip()) for m in _SERVER.finditer(block[2])]


def listen_addresses(text: str) -> list[str]:
    return [m[2] for m in _LISTEN.finditer(text)]


_TOKEN = re.compile(r"#[^\n]*|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[{};]|[^\s{};'\"#]+")


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = field(default=None, repr=False)

    def find(self, name: str) -> list[Directive]:
        """The directives of that name directly inside this block."""
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str, *args: str) -> Directive:
        """The one directive of that name (and leading arguments) inside this block."""
        found = [d for d in self.find(name) if d.args[: len(args)] == list(args)]
        assert len(found) == 1, f"{len(found)} `{name} {' '.join(args)}` in `{self.name}`"
        return found[0]

    def walk(self) -> Iterator[Directive]:
        for child in self.block or []:
            yield child
            yield from child.walk()


def parse(text: str) -> Directive:
    """An nginx config as a tree (enough of the grammar for deploy/nginx.conf: directives,
    blocks, quoted arguments, comments)."""
    root = Directive("main", [], [])
    stack, words = [root], list[str]()
    for token in _TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token in (";", "{"):
            assert words, f"an empty directive before {token!r}"
            node = Directive(
                words[0], [_unquote(w) for w in words[1:]], [] if token == "{" else None
            )
            stack[-1].block.append(node)  # type: ignore[union-attr]
            if token == "{":
                stack.append(node)
            words = []
        elif token == "}":
            assert not words and len(stack) > 1, "unbalanced braces"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unterminated block or directive"
    return root


def _unquote(word: str) -> str:
    return word[1:-1] if word[:1] in "'\"" and word[-1:] == word[:1] else word


def _address(backend: int | str) -> str:
    return f"127.0.0.1:{backend}" if isinstance(backend, int) else backend


def render(backends: Sequence[int | str], port: int, text: str | None = None) -> str:
    """deploy/nginx.conf with `backends` (ports on 127.0.0.1, or host:port) as its upstream
    servers, each with the parameters of the config's own servers, listening on
    127.0.0.1:port. Nothing else changes."""
    text = CONF.read_text() if text is None else text
    servers = upstream_servers(text)
    params = {p for _, p in servers}
    # Each backend gets the same parameters: the config's servers must agree on them.
    assert len(params) == 1, f"the upstream servers' parameters differ: {params}"
    assert backends, "no backends"
    assert len(listen_addresses(text)) == 1, "one listen directive expected"

    def upstream(block: re.Match[str]) -> str:
        lines, placed = [], False
        for line in block[2].splitlines(keepends=True):
            server = _SERVER.fullmatch(line.rstrip("\n"))
            if server is None:
                lines.append(line)
            elif not placed:  # the first server's place takes them all
                lines += [f"{server[1]}server {_address(b)}{server[3]};\n" for b in backends]
                placed = True
        return f"{block[1]}upstream gateways {{\n{''.join(lines)}{block[1]}}}"

    text = _UPSTREAM.sub(upstream, text, count=1)
    return _LISTEN.sub(lambda m: f"{m[1]}listen 127.0.0.1:{port};", text, count=1)


def _prefix() -> Path:
    # nginx's workers run as `nobody` when the tests run as root: the prefix they write
    # temp files under must be reachable by them (mkdtemp makes it 0700).
    path = Path(tempfile.mkdtemp(prefix="nginx-lb-"))
    path.chmod(0o755)
    return path


def nginx_test(text: str) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on a config's text, in a prefix of its own."""
    prefix = _prefix()
    try:
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        return subprocess.run(
            [NGINX, "-t", "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


class NginxLB:
    """nginx from deploy/nginx.conf on a free local port, in front of `backends`."""

    def __init__(
        self, backends: Sequence[int | str], port: int | None = None, log_dir: Path | None = None
    ):
        self.backends = list(backends)
        self.log_dir = log_dir  # where the logs are copied on stop (the prefix is removed)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = _prefix()
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render(self.backends, self.port))
        self.access_log_path = self.prefix / "access.log"  # the config logs to stdout
        self.error_log_path = self.prefix / "error.log"  # and to stderr
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [NGINX, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", "stderr"]

    def start(self, timeout: float = 20.0) -> NginxLB:
        with self.access_log_path.open("wb") as out, self.error_log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*self.command(), "-g", "daemon off;"],
                stdout=out,
                stderr=err,
                # Its own process group: workers outlive a killed master otherwise.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited early:\n{self.error_log()}")
            # The pid file is written once the listening socket is bound: from then on a
            # connection is queued for a worker, however long the workers take to start.
            if (self.prefix / "nginx.pid").exists() and self._accepts():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{self.error_log()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def error_log(self) -> str:
        return self.error_log_path.read_text(errors="replace")[-5000:]

    def access_log(self) -> str:
        return self.access_log_path.read_text(errors="replace")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: nginx's fast shutdown, workers included
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.log_dir is not None:
            for log in (self.access_log_path, self.error_log_path):
                if log.exists():
                    shutil.copy(log, self.log_dir / f"nginx-{self.port}-{log.name}")
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> NginxLB:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Backend:
    """A tiny HTTP/1.1 server in a thread standing in for a replica: it answers with its name
    and the headers it got, and `drops` the requests to /drop (read whole, then the connection
    closes with no answer: a replica that died with the request in hand)."""

    def __init__(self, name: str, drops: bool = False):
        self.name, self.drops = name, drops
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream pool expects

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                backend.seen.append((self.command, self.path, dict(self.headers)))
                if backend.drops and self.path.startswith("/drop"):
                    self.close_connection = True
                    return
                body = json.dumps({"backend": backend.name, "headers": dict(self.headers)})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("x-request-id", f"req_{backend.name}")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_POST = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests(self, method: str) -> list[str]:
        return [path for m, path, _ in self.seen if m == method]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
