"""FHIR search: the parameter registry, value extraction at write time, and query building."""
