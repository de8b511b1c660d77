# The serving image: `modelship serve` on a CUDA-capable base (it also runs without a GPU).
#   docker build -t modelship .                          # serve a bundle mounted at /models/bundle
#   docker build -t modelship --build-arg BUILD_BUNDLE=1 .  # or train + export one at build time
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/quickstart/bundle:/models/bundle:ro modelship
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv make \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 modelship \
    && useradd --create-home --uid 10001 --gid 10001 modelship \
    && mkdir -p /app /models \
    && chown 10001:10001 /app /models

WORKDIR /app
USER 10001:10001
COPY --chown=10001:10001 pyproject.toml Makefile README.md ./
COPY --chown=10001:10001 modelship ./modelship
COPY --chown=10001:10001 training ./training
COPY --chown=10001:10001 export ./export
COPY --chown=10001:10001 serving ./serving
# the same install the README's quickstart does (make run / make test set up .venv the same way)
RUN make install

ARG BUILD_BUNDLE=0
RUN if [ "$BUILD_BUNDLE" = "1" ]; then \
        .venv/bin/modelship run --out /tmp/run --min-accuracy 0.9 --device cpu \
        && cp -r /tmp/run/bundle /models/bundle \
        && rm -rf /tmp/run "$HOME/.cache/modelship"; \
    fi

ENV PATH=/app/.venv/bin:$PATH
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# exec form: modelship is PID 1 and gets SIGTERM, which drains in-flight requests before exiting
CMD ["modelship", "serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000"]
