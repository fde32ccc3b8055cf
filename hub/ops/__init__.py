"""FHIR operations. Importing ``everything`` and ``export`` registers them with
``hub.rest.operations`` (the router does); ``compartment`` has no side effects, so the
write path can use it without importing the REST layer.

- ``compartment``: the Patient compartment (shared by the operations below; registers nothing)
- ``everything``: ``Patient/{id}/$everything``, ``Patient/$everything``
- ``export``: Bulk Data ``$export`` (system, Patient, Group), ``$export-status``, ``$export-file``
"""
