"""The request and response of one FHIR interaction.

Owns: header parsing that every interaction shares (Prefer, If-Match, ETags).
Calls: ``hub.rest.target`` (parsing the request's target).
Called by: the router, the interactions, the web adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from hub.auth.principal import Principal
from hub.errors import FhirError, bad_request
from hub.rest.target import Target, parse

FHIR_JSON = "application/fhir+json"
_ETAG_RE = re.compile(r'^(?:W/)?"?(\d+)"?$')
# A JSON \u0000 escape (not an escaped backslash followed by "u0000").
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


@dataclass
class FhirRequest:
    method: str
    path: str  # below the FHIR base, without leading slash: "Patient/123/_history"
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes | None = None
    parsed_body: dict[str, Any] | None = None  # set when the caller already parsed the JSON
    # Set by a transaction for a POST whose id it chose up front (so references could point to it).
    assigned_id: str | None = None
    # Who asks (set by the web adapter from the bearer token); None = not authenticated.
    principal: Principal | None = None
    client_address: str | None = None
    # The FHIR base of this request's links (BASE_URL, else where the client connected), set
    # by the web adapter; None (a request from the CLI or a test): the router's configured base.
    base_url: str | None = None
    # Set by the access gate when this request opened break-glass access: (ids, reason).
    break_glass: tuple[list[int], str] | None = None
    # The parsed method and path (``target``), computed once.
    _target: tuple[str, str, Target] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def target(self) -> Target:
        """What the request asks for, parsed once from its method and path (and, for
        ``POST [base]``, its Bundle's type)."""
        if self._target is not None and self._target[:2] == (self.method, self.path):
            return self._target[2]
        bundle_type = None
        if self.method == "POST" and not self.path.strip("/"):
            try:
                bundle_type = self.json_body().get("type")
            except FhirError:
                bundle_type = None
        target = parse(self.method, self.path, bundle_type if isinstance(bundle_type, str) else None)
        self._target = (self.method, self.path, target)
        return target

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json_body(self) -> dict[str, Any]:
        if self.parsed_body is not None:
            return self.parsed_body
        if not self.body:
            raise bad_request("The request has no body")
        # FHIR strings may not hold it, nor PostgreSQL text/jsonb. The substring test first: it
        # runs at memchr speed, the regex (an escaped backslash is no escape) at ~10 ns a byte.
        if b"\\u0000" in self.body and _NUL_ESCAPE.search(self.body):
            raise bad_request("The body contains a NUL character (\\u0000)")
        try:
            document = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"The body is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
            raise bad_request("The body must be a FHIR resource: a JSON object with resourceType")
        self.parsed_body = document
        return document

    def prefer(self, key: str) -> str | None:
        """A token of the Prefer header, e.g. prefer('return') -> 'minimal'."""
        for part in (self.header("prefer") or "").split(";"):
            for item in part.split(","):
                name, _, value = item.strip().partition("=")
                if name.strip().lower() == key:
                    return value.strip().strip('"')
        return None

    def if_match(self) -> int | None:
        return parse_etag(self.header("if-match"))


def parse_etag(value: str | None) -> int | None:
    if value is None:
        return None
    match = _ETAG_RE.match(value.strip())
    if not match:
        raise bad_request(f'Malformed ETag {value!r}; expected W/"<version>"')
    return int(match.group(1))


@dataclass
class FhirResponse:
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
