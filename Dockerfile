# syntax=docker/dockerfile:1.7
# Three images from one file:
#   docker build --target operator -t mot-operator:0.1.0 .   # the Kopf controller: slim Python, no torch
#   docker build --target trainer  -t mot-trainer:0.1.0 .    # `mot-train` in the Jobs: CUDA torch
#   docker build --target trainer-vllm -t mot-trainer-vllm:0.1.0 .  # the same plus vLLM for the eval Jobs
# Pass --build-arg VERSION=<pyproject version> --build-arg REVISION=$(git rev-parse HEAD) for the labels.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# The one torch pin: the Makefile reads it, so the test suite runs against the torch the trainer
# image ships. PyPI's Linux x86_64 torch wheel is the CUDA build (2.13.0: CUDA 13.0, its CUDA and
# cuDNN libraries come as pip packages); the node needs only the NVIDIA driver (>= 580 for CUDA 13).
ARG TORCH_VERSION=2.13.0
# vLLM for `mot-train eval --engine vllm`, in the trainer-vllm image only. vLLM pins the torch it is built
# for (0.33.0: torch==2.13.0, transformers>=5.16.1,<5.20), so that image takes vLLM's torch, not TORCH_VERSION.
ARG VLLM_VERSION=0.33.0
ARG VERSION=0.1.0

# ---- wheel: the project as one wheel, without its dependencies ----
FROM ${PYTHON_IMAGE} AS wheel
ARG VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# crds/ is the one source of the MoTRun schema; operator/mot_operator/motruns.mot.dev.yaml links to it
# and the wheel packages the file it points to. Without crds/ the link dangles and setuptools
# silently leaves the CRD out, so the RUN checks the wheel holds it.
COPY crds/ crds/
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); sys.exit(None if sys.argv[2] in names else f'{sys.argv[1]} lacks {sys.argv[2]}')" \
       "/wheels/mot_operator-${VERSION}-py3-none-any.whl" mot_operator/motruns.mot.dev.yaml

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

# ---- trainer-venv: CUDA torch from PyPI at the pinned version, then the trainer's dependencies ----
FROM ${PYTHON_IMAGE} AS trainer-venv
ARG VERSION
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# One resolve with torch pinned: pip cannot pick another torch for transformers or accelerate.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --find-links /wheels \
       "torch==${TORCH_VERSION}" "mot-operator[trainer]==${VERSION}" \
    && /opt/venv/bin/python -c "import sys, torch, mot_trainer.cli; assert torch.version.cuda, 'CPU-only torch'; assert torch.__version__.split('+')[0] == sys.argv[1], torch.__version__" "${TORCH_VERSION}"

# ---- trainer: what every branch, merge and eval Job runs (`mot-train`) ----
FROM ${PYTHON_IMAGE} AS trainer
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mot-trainer" \
      org.opencontainers.image.description="Merge-of-Thought trainer: SFT branches, weight merge, evaluation (mot-train)" \
      org.opencontainers.image.source="https://github.com/mot-operator/mot-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
RUN groupadd --system --gid 65532 mot \
    && useradd --system --uid 65532 --gid mot --create-home --home-dir /home/mot --shell /usr/sbin/nologin mot
COPY --from=trainer-venv /opt/venv /opt/venv
WORKDIR /home/mot
USER 65532:65532
CMD ["mot-train", "--help"]

# ---- trainer-vllm-venv: the trainer's dependencies and vLLM, on the torch vLLM pins ----
FROM ${PYTHON_IMAGE} AS trainer-vllm-venv
ARG VERSION
ARG VLLM_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# One resolve with vLLM pinned and torch left to it: the trainer image's torch pin is not applied here.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --find-links /wheels \
       "vllm==${VLLM_VERSION}" "mot-operator[trainer,vllm]==${VERSION}" \
    && /opt/venv/bin/python -c "import sys, torch, vllm, mot_trainer.cli; assert torch.version.cuda, 'CPU-only torch'; assert vllm.__version__.split('+')[0] == sys.argv[1], vllm.__version__" "${VLLM_VERSION}"

# ---- trainer-vllm: the trainer image plus vLLM; set as a MoTRun's spec.image for evaluation.engine vllm ----
FROM ${PYTHON_IMAGE} AS trainer-vllm
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mot-trainer-vllm" \
      org.opencontainers.image.description="Merge-of-Thought trainer with vLLM for evaluation (mot-train eval --engine vllm)" \
      org.opencontainers.image.source="https://github.com/mot-operator/mot-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
RUN groupadd --system --gid 65532 mot \
    && useradd --system --uid 65532 --gid mot --create-home --home-dir /home/mot --shell /usr/sbin/nologin mot
COPY --from=trainer-vllm-venv /opt/venv /opt/venv
WORKDIR /home/mot
USER 65532:65532
CMD ["mot-train", "--help"]
