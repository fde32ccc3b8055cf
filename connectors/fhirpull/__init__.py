"""FHIR pull: a facility that runs a FHIR server is polled for what changed, by ``_lastUpdated``
searches or its Bulk ``$export``, and every page lands in the inbox like any other message.

Owns: the package's public names: ``FORMAT`` (the "fhir" format: peek and map of a pulled page,
``mapping``), ``Poller`` and ``PullError`` (``poller``).
Calls: its two modules.
Called by: ``connectors.pipeline`` (``FORMAT``), the worker and CLI (``Poller``), the tests.
"""

from __future__ import annotations

from connectors.fhirpull.mapping import FORMAT, SKIPPED, FhirFormat, pull_order
from connectors.fhirpull.poller import Poller, PullError

__all__ = ["FORMAT", "SKIPPED", "FhirFormat", "Poller", "PullError", "pull_order"]
