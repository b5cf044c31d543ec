# One image for every mmserve service; the command picks the service (ENTRYPOINT is `python -m`):
#   docker build -t mmserve:cpu  --build-arg VARIANT=cpu  .    torch's CPU wheel, no CUDA libraries
#   docker build -t mmserve:cuda --build-arg VARIANT=cuda .    torch's CUDA wheel plus the gpu extra
#   docker run --rm mmserve:cpu services.router --help
# The CUDA variant needs no CUDA base image: torch's PyPI wheel carries the CUDA runtime libraries and the
# NVIDIA container toolkit mounts the host driver. flash-attn (gpu extra) installs its prebuilt wheel when one
# matches torch, CUDA and Python; otherwise it compiles, which needs nvcc (build on an nvidia/cuda devel base).
ARG VARIANT=cpu

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --user-group mmserve
WORKDIR /app

# torch first and alone, from the index that has the wanted build; the pin in pyproject.toml (torch==2.13.0,
# which 2.13.0+cpu satisfies) keeps every later install from replacing it.
FROM base AS torch-cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

FROM base AS torch-cuda
# flash-attn's build imports torch, so the gpu extra installs without build isolation and needs these present.
RUN pip install torch==2.13.0 \
    && pip install "setuptools>=68" wheel packaging ninja psutil

FROM torch-${VARIANT} AS final
ARG VARIANT
# The extra the cuda variant installs: gpu (PyNvVideoCodec, flash-attn); `--build-arg GPU_EXTRA=` leaves it out,
# and the services fall back to PyTorch SDPA and CPU decoding (chosen by capability at run time).
ARG GPU_EXTRA=gpu
COPY pyproject.toml README.md ./
COPY mmserve mmserve
COPY services services
COPY stack stack
RUN case "$VARIANT" in \
      cuda) pip install --no-build-isolation ".${GPU_EXTRA:+[$GPU_EXTRA]}" ;; \
      cpu) pip install . ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac \
    && cd /tmp && python -c "import torch, stack.cli, services.router.config; print('torch', torch.__version__)"
USER mmserve
ENTRYPOINT ["python", "-m"]
CMD ["stack", "--help"]
