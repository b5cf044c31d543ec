# One image for every mmserve service; the entry point picks the service.
#   docker build -t mmserve .                         (CPU)
#   docker build -t mmserve --build-arg VARIANT=gpu . (CUDA; adds the gpu extra)
# TORCH_PIP_ARGS selects the torch build, e.g. "--index-url <your CPU wheel index>" for a CPU image.
FROM python:3.11-slim
ARG VARIANT=cpu
ARG TORCH_PIP_ARGS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mmserve mmserve
COPY services services
RUN pip install torch==2.13.0 $TORCH_PIP_ARGS \
    && if [ "$VARIANT" = "gpu" ]; then pip install '.[gpu]'; else pip install .; fi
ENTRYPOINT ["python", "-m"]
