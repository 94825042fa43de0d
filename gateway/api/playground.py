"""Placeholder: filled in by the playground work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
