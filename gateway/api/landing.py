"""Placeholder: filled in by the landing work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
