"""Refuses every connection that would leave loopback: installed in the test process and in
each gateway process the tests start, so no test can reach a real provider."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkEscape(ConnectionRefusedError):
    pass


def _check(address: Any) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0]).split("%")[0]
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host == "localhost":
                return
        raise NetworkEscape(f"test tried to reach {host}: only loopback is allowed")


def _connect(self: socket.socket, address: Any) -> None:
    _check(address)
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _check(address)
    return _real_connect_ex(self, address)


def install() -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
