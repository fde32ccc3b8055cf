"""The FHIR REST semantics, independent of the web framework.

``FhirRouter.handle(FhirRequest) -> FhirResponse`` is the whole interface: the FastAPI app
adapts HTTP to it, and Bundle transactions call it once per entry.
"""

from hub.rest.messages import FhirRequest, FhirResponse
from hub.rest.router import FhirRouter

__all__ = ["FhirRequest", "FhirResponse", "FhirRouter"]
