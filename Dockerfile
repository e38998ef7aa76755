# pii-vault container image.
#
#   docker build -t piivault .
#   docker compose up            # Postgres + KMS emulator + the vault (see docker-compose.yml)
#
# Two stages: the builder makes a virtualenv holding the app and its runtime
# dependencies (never the [dev] extras); the final stage gets that virtualenv,
# alembic.ini and migrations/ and nothing else: no compiler, no source tree.
# Only features of the classic builder are used, so any Docker (BuildKit or
# not) and any compose implementation can build it.

# Both stages must share one interpreter: the virtualenv's python is a symlink
# to the base image's. Pinned to an exact Python release and Debian release (bookworm, which
# the suite runs on), so a rebuild does not move to another interpreter or distribution.
# Bump the patch release deliberately, with the suite.
#
# A tag can still be re-pushed; a digest cannot. Where the registry is reachable, pin the
# digest too (never one copied from memory or another project):
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm   # "Digest: sha256:..."
#   (or: docker pull python:3.11.14-slim-bookworm &&
#        docker inspect --format '{{index .RepoDigests 0}}' python:3.11.14-slim-bookworm)
# then build with --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<that digest>,
# or write it below. The digest is of the multi-arch index, so amd64 and arm64 both resolve.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, from requirements.lock: every package pinned to one version with the
# hashes of its published files (pip-compile --generate-hashes; `make lock` regenerates it), so
# two builds install the same bytes and a tampered download fails. This slow layer is rebuilt only
# when the lock changes. All of them ship manylinux wheels (amd64 and arm64): no compiler here.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps --requirement requirements.lock

# Then the app itself, as a regular (non-editable) install. --no-deps: the
# dependencies are already in; `pip check` fails the build if the lock no longer
# satisfies pyproject.toml.
# Finally drop the installers from the virtualenv: nothing needs them at run
# time, and the old setuptools that venv bundles only draws scanner findings.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-deps . \
    && pip check \
    && python -m pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="pii-vault" \
      org.opencontainers.image.description="PII tokenization vault with KMS envelope encryption"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed, unprivileged uid/gid with no login shell; files stay root-owned, so
# the process cannot rewrite its own code or migrations.
RUN groupadd --system --gid 10001 piivault \
    && useradd --system --uid 10001 --gid piivault --home-dir /home/piivault --create-home \
        --shell /usr/sbin/nologin piivault

COPY --from=builder /opt/venv /opt/venv

# Commands run from here: `piivault migrate` finds migrations/ in the working
# directory, and alembic.ini beside it serves anyone running `alembic` by hand.
WORKDIR /srv/piivault
COPY alembic.ini ./
COPY migrations ./migrations

USER 10001:10001

EXPOSE 8000

# Readiness, not liveness: Docker's health status is what compose's `service_healthy`, Swarm's
# rolling updates and proxies that read it (Traefik and the like) use to decide whether this
# container should get requests, and a vault that cannot reach its database or KMS cannot serve
# one. /healthz only says the process is up, so a vault cut off from KMS counted as healthy.
# Plain Docker never restarts an unhealthy container, so an outage of KMS or the database marks
# every replica unhealthy without killing them; they become healthy again by themselves.
# (Under Swarm, which does replace unhealthy tasks, an outage would recycle the replicas: there,
# point this at /healthz.) Kubernetes ignores HEALTHCHECK: deploy/k8s/ uses both probes, each
# for its own purpose. /readyz checks the database and KMS at most every PIIVAULT_READY_CACHE_S.
# The slim image has no curl: probe with the stdlib. urlopen raises on any non-2xx status
# (503 while not ready) or connection error, which exits non-zero (unhealthy).
# start-period covers the migrations that run before the server listens.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# Migrate, then replace the shell with the server so it is PID 1 and gets SIGTERM.
# Alembic takes a Postgres advisory lock, so replicas starting together are safe.
CMD ["sh", "-c", "piivault migrate && exec piivault serve --no-migrate --host 0.0.0.0 --port 8000 --workers 2"]
