"""Pages of the portal area (filled in by issue 12's work).

Owns: the routes under this area's prefix.  Calls: hub.web.context.  Called by: hub.web.app.
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
