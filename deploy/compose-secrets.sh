#!/bin/sh
# Writes the compose stack's secrets (random passwords and the two database URLs) into
# deploy/secrets/, once; docker-compose.yml mounts them as compose secrets. Kept out of git.
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
secret() { [ -s "$dir/$1" ] || (umask 022 && printf '%s' "$2" > "$dir/$1"); }
random() { od -An -N18 -tx1 /dev/urandom | tr -d ' \n'; }
secret postgres_password "$(random)"
secret piivault_migrator_password "$(random)"
secret piivault_app_password "$(random)"
secret piivault_migrator_database_url \
    "postgresql://piivault_migrator:$(cat "$dir/piivault_migrator_password")@postgres:5432/piivault"
secret piivault_app_database_url \
    "postgresql://piivault_app:$(cat "$dir/piivault_app_password")@postgres:5432/piivault"
echo "compose secrets in $dir"
