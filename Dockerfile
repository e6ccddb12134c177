# FlexServe's gateway (and its sim engine) as an image:
#   docker build -t flexserve .
#   docker run -p 8000:8000 flexserve          # the embedded model, SQLite in a volume
# compose.yaml starts a fleet from it: PostgreSQL, Redis, two gateways, a sim engine.
#
# Three stages. The first compiles llama.cpp into llama-cpp-python's wheel
# (about 5 minutes on two cores) with the compilers, and depends on nothing
# of FlexServe's: a change to the code does not build it again. The second
# installs FlexServe and everything else into a virtual environment; the
# last is that environment on the same base, with no compiler or wheel.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS llama
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
# As the Makefile builds it: AVX2 rather than the build machine's every
# feature (llama.cpp's AMX kernels die with SIGILL on hosts that advertise
# AMX but do not grant it).
ARG LLAMA_VERSION=0.3.36
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF"
RUN python -m venv /opt/build \
 && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
      "llama-cpp-python==${LLAMA_VERSION}"

FROM ${PYTHON_IMAGE} AS install
COPY --from=llama /wheels /wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/flexserve \
 && /opt/flexserve/bin/pip install --no-cache-dir --find-links /wheels ".[embedded,postgres,redis,otel]"

FROM ${PYTHON_IMAGE}
# llama.cpp's CPU backend is built with OpenMP: its runtime, and nothing else.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=install /opt/flexserve /opt/flexserve
RUN useradd --create-home --uid 10001 flexserve \
 && mkdir -p /data && chown flexserve /data
ENV PATH=/opt/flexserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLEXSERVE_HOST=0.0.0.0 \
    FLEXSERVE_HOME=/data
USER flexserve
WORKDIR /data
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request, os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLEXSERVE_PORT', '8000'), timeout=2)"
ENTRYPOINT ["flexserve"]
CMD ["serve"]
