"""FHIR operations. Importing this package registers each operation with ``hub.rest.operations``.

- ``compartment``: the Patient compartment (shared by the operations below; registers nothing)
- ``everything``: ``Patient/{id}/$everything``, ``Patient/$everything``
- ``export``: Bulk Data ``$export`` (system, Patient, Group), ``$export-status``, ``$export-file``
"""

from hub.ops import everything, export  # noqa: F401  (registration side effects)
