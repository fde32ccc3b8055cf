"""Page routes, one module per area: clinician, portal, console."""
