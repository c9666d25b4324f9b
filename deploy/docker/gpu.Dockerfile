# The GPU worker image: onnxruntime-gpu (CUDA 12, cuDNN 9) on NVIDIA's CUDA runtime base, pinned by digest.
# Linted where slidr is developed (hadolint: tests/deploy/test_manifests.py), built where a registry serves the
# base: `docker build -f deploy/docker/gpu.Dockerfile -t slidr-worker-gpu .` The worker logs the execution
# provider it got (CUDA, or CPU when no GPU is visible to the container), and SLIDR_ONNX_PROVIDERS keeps the
# settings default (TensorRT, CUDA, then CPU). Ubuntu 24.04's python3 is 3.12 (slidr needs 3.11+).
# VARIANT=gpu-train adds the training extra (torch): the image of the retrain CronJob (deploy/k8s/jobs.yaml).
ARG BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04@sha256:8aef630a54bc5c5146ae5ce68e6af5caa3df0fb690bb91544175c91f307e4356

FROM ${BASE} AS build
ARG VARIANT=gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN --mount=type=secret,id=pipcert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
    && python3 /tmp/requirements.py pyproject.toml "$VARIANT" > /tmp/requirements.txt \
    && python3 -m venv /opt/slidr \
    && /opt/slidr/bin/pip install -q --disable-pip-version-check -r /tmp/requirements.txt
COPY slidr slidr
COPY stream stream
COPY models models
COPY schemas schemas
COPY bench bench
RUN --mount=type=secret,id=pipcert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
    && /opt/slidr/bin/pip install -q --disable-pip-version-check --no-deps . \
    && /opt/slidr/bin/pip uninstall -q -y pip

FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/slidr --create-home --shell /usr/sbin/nologin slidr \
    && mkdir /registry && chown slidr /registry
COPY --from=build /opt/slidr /opt/slidr
ENV PATH=/opt/slidr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SLIDR_HOME=/var/lib/slidr \
    SLIDR_REGISTRY_PATH=/registry \
    SLIDR_METRICS_PORT=9400 \
    SLIDR_METRICS_BIND=0.0.0.0 \
    SLIDR_WORKER_WEB_PORT=0
USER 10001
WORKDIR /var/lib/slidr
EXPOSE 9400
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 CMD ["slidr", "health"]
ENTRYPOINT ["slidr"]
CMD ["worker"]
