"""HTTP: routers parse and shape; the rules are in app.services."""
