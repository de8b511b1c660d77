# The serving image: `modelship serve` from the light `modelship[serve]` install (ONNX Runtime + LitServe, no torch),
# on a CUDA + cuDNN base so ONNX Runtime's CUDA provider runs where a GPU is given; it runs without a GPU too.
#   docker build -t modelship .                                  # serve a bundle mounted at /models/bundle
#   docker build -t modelship:shapes --target serve-shapes .     # or with the quickstart's shapes bundle baked in
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/quickstart/bundle:/models/bundle:ro modelship
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 modelship \
    && useradd --create-home --uid 10001 --gid 10001 modelship \
    && mkdir -p /app /models \
    && chown 10001:10001 /app /models

WORKDIR /app
USER 10001:10001
# modelship/training, modelship/export and modelship/serving are links to these three folders
COPY --chown=10001:10001 pyproject.toml README.md ./
COPY --chown=10001:10001 modelship ./modelship
COPY --chown=10001:10001 training ./training
COPY --chown=10001:10001 export ./export
COPY --chown=10001:10001 serving ./serving
RUN python3 -m venv .venv
ENV PATH=/app/.venv/bin:$PATH

# build stage for `--target serve-shapes`: the full install trains and exports the quickstart bundle on CPU
FROM base AS shapes-bundle
# hadolint ignore=DL3013
RUN pip install ".[train,export]" \
    && modelship run --out /tmp/run --min-accuracy 0.9 --device cpu

FROM base AS serve
# the light install: no torch, no torchvision, no onnx exporter (this project; its pins are in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install ".[serve]"
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# exec form: modelship is PID 1 and gets SIGTERM, which drains in-flight requests before exiting
CMD ["modelship", "serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000", "--grpc-port", "8001"]

FROM serve AS serve-shapes
COPY --from=shapes-bundle --chown=10001:10001 /tmp/run/bundle /models/bundle

# the default target: the light serving image, with the bundle mounted at run time
FROM serve
