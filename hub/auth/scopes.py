"""SMART App Launch v2 scopes: ``context/Type.perms?query``.

Owns: parsing scope strings and answering "does this scope set allow interaction X on
type T, and under which granular restrictions?". v1 forms (``patient/*.read``,
``user/Observation.write``, ``*.*``) are read as their v2 equivalents.
Calls: nothing.  Called by: principal, the access decision, the token issuer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

# v2 permissions in their mandated order: create, read, update, delete, search.
PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE_RE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([a-z*]+)(?:\?(.*))?$")


@dataclass(frozen=True)
class Scope:
    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    permissions: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()  # granular restriction, e.g. (("category", "laboratory"),)

    def covers(self, resource_type: str, permission: str) -> bool:
        return permission in self.permissions and self.resource_type in ("*", resource_type)

    def __str__(self) -> str:
        perms = "".join(p for p in PERMISSIONS if p in self.permissions)
        query = "?" + "&".join(f"{k}={v}" for k, v in self.query) if self.query else ""
        return f"{self.context}/{self.resource_type}.{perms}{query}"


def parse_scope(text: str) -> Scope | None:
    """A clinical-data scope, or None for anything else (openid, fhirUser, launch/patient...)."""
    match = _SCOPE_RE.match(text)
    if match is None:
        return None
    context, resource_type, perms, query = match.groups()
    if perms in _V1:
        permissions = _V1[perms]
    elif all(p in PERMISSIONS for p in perms) and list(perms) == sorted(perms, key=PERMISSIONS.index):
        permissions = perms
    else:
        return None
    return Scope(context, resource_type, frozenset(permissions), tuple(parse_qsl(query or "")))


@dataclass(frozen=True)
class ScopeSet:
    scopes: tuple[Scope, ...]
    other: tuple[str, ...] = ()  # non-resource scopes: openid, fhirUser, offline_access...

    @classmethod
    def parse(cls, text: str) -> ScopeSet:
        scopes, other = [], []
        for item in text.split():
            scope = parse_scope(item)
            if scope is None:
                other.append(item)
            else:
                scopes.append(scope)
        return cls(tuple(scopes), tuple(other))

    def granting(self, resource_type: str, permission: str) -> list[Scope]:
        """The scopes that allow ``permission`` (one of c r u d s) on ``resource_type``."""
        return [s for s in self.scopes if s.covers(resource_type, permission)]

    def allows(self, resource_type: str, permission: str) -> bool:
        return bool(self.granting(resource_type, permission))

    def __str__(self) -> str:
        return " ".join([*(str(s) for s in self.scopes), *self.other])
