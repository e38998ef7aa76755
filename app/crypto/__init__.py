"""Envelope format and key providers. Knows nothing of HTTP or the database."""
