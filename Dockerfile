# tlearn serve: the torch-free base install (onnxruntime/OpenVINO engines) serving a model mounted at /model.
#   make image                      # or: docker build -t tlearn-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/my-model:/model:ro" tlearn-serve
# BASE is overridable for machines that reach no registry (see scripts/debian-base-image.sh).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# behind a TLS-intercepting proxy: mount its CA bundle for the build and name it, e.g.
#   -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# the wheel holds tlearn only; its base dependencies (no torch) come from PyPI into a venv copied below
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade "pip>=24" \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/tlearn-*.whl \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 tlearn \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home tlearn
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TLEARN_CACHE=/tmp/tlearn
USER 10001:10001
EXPOSE 8000
# mount a model folder here (read-only is fine), or COPY one in a derived image
VOLUME ["/model"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# inside the container 0.0.0.0 is needed for -p to reach it; publish the port on 127.0.0.1 on the host
ENTRYPOINT ["tlearn", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
