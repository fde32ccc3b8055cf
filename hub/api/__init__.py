"""The HTTP adapter: FastAPI routes that hand every FHIR request to ``hub.rest.FhirRouter``."""
