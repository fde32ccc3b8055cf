"""FHIR operations. Importing this package registers each operation with ``hub.rest.operations``."""
