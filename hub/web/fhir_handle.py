"""The pages' one way to citizens' data: FHIR requests through the hub's router.

Owns: ``FhirHandle``, which carries the logged-in person's principal and sends every read,
search and write of a page through ``FhirRouter.handle`` exactly as ``/fhir`` does: the same
access decision and consent row filter, the same AuditEvent, break-glass and purpose
headers. There is no other path: hub/web never reads patient data from the store or SQL.
Calls: the ``answer`` function ``create_app`` hands to ``mount_pages`` (the router under a
request guard, failures as OperationOutcome).
Called by: page views (through ``Page.fhir``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from hub.auth.principal import Principal
from hub.rest.messages import FhirRequest, FhirResponse

Answer = Callable[[FhirRequest], FhirResponse]
Params = Iterable[tuple[str, str]] | Mapping[str, str]


class PageFhirError(Exception):
    """A FHIR request of a page was refused or failed (status and OperationOutcome)."""

    def __init__(self, status: int, outcome: dict[str, Any]) -> None:
        super().__init__(f"{status}: {self.describe(outcome)}")
        self.status = status
        self.outcome = outcome

    @staticmethod
    def describe(outcome: Mapping[str, Any]) -> str:
        issues = outcome.get("issue") or []
        texts = [str(i.get("diagnostics") or i.get("code") or "") for i in issues if isinstance(i, Mapping)]
        return "; ".join(t for t in texts if t) or "error"

    @property
    def message(self) -> str:
        return self.describe(self.outcome)


class FhirHandle:
    def __init__(
        self,
        answer: Answer,
        principal: Principal,
        client_address: str | None = None,
        base_url: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._answer = answer
        self.principal = principal
        self.client_address = client_address
        self.base_url = base_url
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}

    def with_headers(self, headers: Mapping[str, str]) -> FhirHandle:
        """The same person, with extra request headers (``x-break-glass-reason``, ``x-purpose-of-use``)."""
        return FhirHandle(
            self._answer, self.principal, self.client_address, self.base_url, {**self._headers, **headers}
        )

    def request(
        self,
        method: str,
        path: str,
        query: Params = (),
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> FhirResponse:
        pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
        all_headers = {"accept": "application/fhir+json", **self._headers}
        all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
        raw = None
        if body is not None:
            raw = orjson.dumps(body)
            all_headers["content-type"] = "application/fhir+json"
        fhir_request = FhirRequest(method.upper(), path.strip("/"), pairs, all_headers, raw)
        fhir_request.principal = self.principal
        fhir_request.client_address = self.client_address
        fhir_request.base_url = self.base_url
        return self._answer(fhir_request)

    def _json(self, response: FhirResponse) -> dict[str, Any]:
        try:
            parsed = orjson.loads(response.body) if response.body else {}
        except orjson.JSONDecodeError:
            parsed = {}
        return parsed if isinstance(parsed, dict) else {}

    def _checked(self, response: FhirResponse) -> dict[str, Any]:
        parsed = self._json(response)
        if response.status >= 400:
            raise PageFhirError(response.status, parsed)
        return parsed

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The resource, or None when it does not exist, is gone, or is hidden (one answer)."""
        response = self.request("GET", f"{resource_type}/{resource_id}")
        if response.status in (404, 410):
            return None
        return self._checked(response)

    def search(self, resource_type: str, params: Params = ()) -> dict[str, Any]:
        """The searchset Bundle (raises PageFhirError on errors)."""
        return self._checked(self.request("GET", resource_type, params))

    def search_resources(self, resource_type: str, params: Params = ()) -> list[dict[str, Any]]:
        bundle = self.search(resource_type, params)
        return [e["resource"] for e in bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]

    def operation(self, path: str, params: Params = (), method: str = "GET") -> dict[str, Any]:
        return self._checked(self.request(method, path, params))

    def create(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        return self._checked(self.request("POST", str(resource["resourceType"]), body=resource))

    def update(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        path = f"{resource['resourceType']}/{resource['id']}"
        return self._checked(self.request("PUT", path, body=resource))

    def delete(self, resource_type: str, resource_id: str) -> None:
        self._checked(self.request("DELETE", f"{resource_type}/{resource_id}"))
