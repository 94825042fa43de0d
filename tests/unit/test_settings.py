"""Settings that are refused at start, with the reason, rather than misbehaving later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import Settings


@pytest.mark.parametrize(
    "url", ["https://user:secret@gw.example.com", "https://token@gw.example.com/", "gw.example"]
)
def test_a_public_url_with_credentials_or_no_scheme_is_refused(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It is printed at start, on the landing page, and in every result URL.
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", url)
    with pytest.raises(ValidationError, match="GATEWAY_PUBLIC_URL"):
        Settings()


def test_a_plain_public_url_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", "https://gw.example.com/base")
    assert Settings().public_url == "https://gw.example.com/base"
