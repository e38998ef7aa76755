#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory
# (/docker-entrypoint-initdb.d): creates pii-vault's migration and serving roles with the
# passwords from the compose secrets. The database URLs in secrets/ must use the same passwords.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v migrator_password="$(cat /run/secrets/piivault_migrator_password)" \
    -v app_password="$(cat /run/secrets/piivault_app_password)" \
    -f /piivault/roles.sql
