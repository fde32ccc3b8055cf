"""The hub's pages: the clinician's integrated record, the patient portal, the operator console.

Owns: server-rendered HTML (Jinja2 + htmx + Alpine), the web session (cookie, CSRF), i18n
(Babel: Vietnamese default, English), security headers, static files.
Calls: the FHIR router through ``hub.web.fhir_handle.FhirHandle`` (the same access decision,
consent filter and audit as ``/fhir``), the token service (login), operator functions
(users, connectors, break-glass, audit verify).
Called by: ``hub.api.app.create_app`` (``mount_pages``).
"""
