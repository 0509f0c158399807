# syntax=docker/dockerfile:1.19@sha256:b6afd42430b15f2d2a4c5a02b919e98a525b785b1aaff16747d2f623364e39b6
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores image HEALTHCHECKs; the broker's pod probes /healthz and /readyz instead.
# The runner broker's image: the runtime module gpu_runners/ and the broker's dependencies, pinned
# with hashes, on a slim Python; no Actions runner, no compilers. The broker Deployment runs it
# (`python -m gpu_runners.broker`). The build context is the repository root
# (docker/broker.Dockerfile.dockerignore keeps it small):
#   docker build -f docker/broker.Dockerfile .

# Python 3.12 (the version docker/broker-requirements.txt is compiled for) on Debian bookworm,
# pinned by digest: bump the tag and the digest together.
FROM python:3.12-slim-bookworm@sha256:782412e85d0f0984994c290652577d4018aff08145c85b262bb63dc0c7522254 AS dependencies
# Every package, dependencies included, is listed with its hashes (--require-hashes), so nothing
# unreviewed is resolved at build time (--no-deps), and only wheels are installed (no build step
# runs code). pip leaves the virtualenv afterwards: nothing installs into it at run time.
COPY docker/broker-requirements.txt /tmp/broker-requirements.txt
RUN python -m venv /opt/broker/venv \
    && /opt/broker/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        --require-hashes --no-deps --only-binary=:all: \
        --requirement /tmp/broker-requirements.txt \
    && /opt/broker/venv/bin/python -m pip uninstall --yes --quiet pip

FROM python:3.12-slim-bookworm@sha256:782412e85d0f0984994c290652577d4018aff08145c85b262bb63dc0c7522254
LABEL org.opencontainers.image.title="gpu-runners-broker" \
      org.opencontainers.image.description="The runner broker: spawns per-run GPU runners for GitHub Actions jobs that prove their run with an OIDC token"

# The pod runs as uid/gid 10001 (contract.BROKER_UID); a user without a home or a login shell.
RUN groupadd --gid 10001 broker \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin broker

COPY --from=dependencies /opt/broker/venv /opt/broker/venv
# Last, as it changes most often; owned by root and read-only for the broker's user.
COPY gpu_runners/ /opt/broker/lib/gpu_runners/

# PYTHONDONTWRITEBYTECODE: the pod's root filesystem is read-only.
ENV PATH=/opt/broker/venv/bin:${PATH} \
    PYTHONPATH=/opt/broker/lib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric, so that the kubelet can verify runAsNonRoot.
USER 10001:10001
WORKDIR /opt/broker
EXPOSE 8080
ENTRYPOINT ["python", "-m", "gpu_runners.broker"]
