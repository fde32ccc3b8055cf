"""The FHIR record store: versioned resources in SQL, with their search indexes.

Public surface: ``Store``, ``StoredResource``, ``NewResource``.
"""

from hub.store.records import NewResource, StoredResource
from hub.store.store import Store

__all__ = ["NewResource", "Store", "StoredResource"]
