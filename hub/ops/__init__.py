"""FHIR operations. Importing a module registers nothing: ``hub.app_factory`` registers
the handlers of ``everything`` and ``export`` with the router's ``hub.rest.operations.Operations``;
``compartment`` can be used by the write path without the REST layer.

- ``compartment``: the Patient compartment (shared by the operations below; registers nothing)
- ``everything``: ``Patient/{id}/$everything``, ``Patient/$everything``
- ``export``: Bulk Data ``$export`` (system, Patient, Group), ``$export-status``, ``$export-file``
"""
