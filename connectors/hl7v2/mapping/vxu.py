"""Placeholder: mapping of this message family (being written)."""

from __future__ import annotations

from connectors.hl7v2.mapping import Mapper

MAPPERS: dict[str, Mapper] = {}
