"""Bulk import of FHIR content from files: Bundles, NDJSON, gzip, folders."""
