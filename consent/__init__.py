"""The access layer: who may see and write which FHIR resources, enforced in SQL.

Modules (each states what it owns, calls and is called by; design in docs/access.md):

- ``decision``: ``Access``, the one place where access is decided: the role/scope ceiling of
  an interaction (403) and the row condition every read and search statement carries.
- ``context``: the current request's ``Access`` (a context variable), the hooks the store and
  search engine call on every read and write, and ``system_access`` for work that is not a
  request; fail closed, without an Access nothing is read or written.
- ``derive``: the ``compartment`` and ``access_grant`` rows derived from each resource when
  it is written (Consent, policy grants, proxies, compartment membership).
- ``labels``: the sensitivity classes (HIV, mental health, ...) of a resource, as a bit mask.
- ``governance``: who may write which Consent, and the consent alerts.
- ``breakglass``: emergency access, its alerts and their reviews.

Called by: the REST layer (an ``Access`` per request, break-glass), the store, the search
engine, the operations, bulk ingest, the CLI and ``hub.api.access_routes``.
"""
