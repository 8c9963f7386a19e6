# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t mot-operator:0.1.0 .   # the Kopf controller: slim Python, no torch
#   docker build --target trainer  -t mot-trainer:0.1.0 .    # `mot-train` in the Jobs: CUDA torch
# Pass --build-arg VERSION=<pyproject version> --build-arg REVISION=$(git rev-parse HEAD) for the labels.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# CUDA 12.8 + cuDNN 9 runtime with torch preinstalled; its Python must be >= 3.11 (pyproject).
ARG TORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
ARG VERSION=0.1.0

# ---- wheel: the project as one wheel, without its dependencies ----
FROM ${PYTHON_IMAGE} AS wheel
ARG VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && test -f "/wheels/mot_operator-${VERSION}-py3-none-any.whl"

# ---- operator-venv: the operator's dependencies in a venv that the final stage copies whole ----
FROM ${PYTHON_IMAGE} AS operator-venv
ARG VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --find-links /wheels "mot-operator[operator]==${VERSION}" \
    && /opt/venv/bin/python -c "import mot_operator, kopf" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# ---- operator: what the Helm chart's Deployment runs (`mot operator`) ----
FROM ${PYTHON_IMAGE} AS operator
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mot-operator" \
      org.opencontainers.image.description="Kubernetes operator for Merge-of-Thought distillation (MoTRun)" \
      org.opencontainers.image.source="https://github.com/mot-operator/mot-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 65532 mot \
    && useradd --system --uid 65532 --gid mot --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mot
COPY --from=operator-venv /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8080
CMD ["mot", "operator"]

# ---- trainer: what every branch, merge and eval Job runs (`mot-train`) ----
FROM ${TORCH_IMAGE} AS trainer
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mot-trainer" \
      org.opencontainers.image.description="Merge-of-Thought trainer: SFT branches, weight merge, evaluation (mot-train)" \
      org.opencontainers.image.source="https://github.com/mot-operator/mot-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/tmp/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
COPY --from=wheel /wheels /wheels
# The venv sees the base image's CUDA torch (system site-packages), so pip keeps it instead of
# pulling another torch.
RUN python -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --find-links /wheels "mot-operator[trainer]==${VERSION}" \
    && /opt/venv/bin/python -c "import torch, mot_trainer; assert torch.version.cuda, 'CPU-only torch'" \
    && rm -rf /wheels \
    && groupadd --system --gid 65532 mot \
    && useradd --system --uid 65532 --gid mot --create-home --home-dir /home/mot --shell /usr/sbin/nologin mot
WORKDIR /home/mot
USER 65532:65532
CMD ["mot-train", "--help"]
