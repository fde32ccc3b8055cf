"""Vietnamese e-health integration hub: one FHIR R4 record per citizen."""

__version__ = "0.1.0"
