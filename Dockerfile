# The retry-safe gateway (and the rest of the strands-dedup CLI) in a slim image.
#   docker build -t strands-dedup .
#   docker run --rm -p 8787:8787 strands-dedup gateway --host 0.0.0.0 \
#     --upstream http://agent:8080 --redis-url redis://redis:6379/0
# The base image is pinned by version tag; pin it by digest too (python:3.11.13-slim-bookworm@sha256:...)
# where builds must be bit-for-bit reproducible.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# -- build: the wheel, then a virtual environment holding it with the http extra ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY strands_dedup ./strands_dedup
# The environment gets no pip or setuptools of its own: the build stage's pip installs into it
# (--python), so nothing that only installs packages reaches the runtime image.
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/strands-dedup \
 && wheel="$(ls /dist/strands_dedup-*.whl)" \
 && pip --python /opt/strands-dedup/bin/python install "${wheel}[http]" \
 && /opt/strands-dedup/bin/strands-dedup --version

# -- runtime: the virtual environment only, run by an unprivileged user --------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 strands-dedup \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin \
      strands-dedup
COPY --from=build /opt/strands-dedup /opt/strands-dedup
ENV PATH=/opt/strands-dedup/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    STRANDS_DEDUP_PORT=8787
USER 10001:10001
EXPOSE 8787
# A gateway's readiness (Redis reachable) on the address and port it was started with (its
# --host/--port, else STRANDS_DEDUP_HOST/STRANDS_DEDUP_PORT); any other command (doctor,
# fake-agent, ...) has nothing to probe and is reported healthy.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["strands-dedup", "healthcheck", "--timeout", "2"]
ENTRYPOINT ["strands-dedup"]
CMD ["--help"]
