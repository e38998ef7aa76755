"""The vault's rules. Nothing here knows of FastAPI; callers pass a session and a RequestContext."""
