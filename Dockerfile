# qsmprep container: `docker build -t qsmprep .` (CPU) or
# `docker build --build-arg VARIANT=cuda -t qsmprep:cuda .` (NVIDIA GPU; run with --gpus all).
# Run as any user:  docker run --rm -u "$(id -u):$(id -g)" -v /data:/data qsmprep /data/bids /data/out participant
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu: PyTorch's CPU-only wheels (small image); cuda: the default wheels, which bundle the CUDA runtime
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/qsmprep
ENV PATH=/opt/qsmprep/bin:$PATH PIP_NO_CACHE_DIR=1
RUN case "$VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md /src/
COPY qsmprep /src/qsmprep
RUN pip install /src && qsmprep --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="Quantitative susceptibility mapping BIDS-App" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/qsmprep /opt/qsmprep
# Non-root friendly: any UID can run it, writable HOME and caches under /tmp.
# The working directory is /tmp, so the default Nipype work directory (./work) is
# lost with the container: users keep it with -w (docs/containers.md).
ENV PATH=/opt/qsmprep/bin:$PATH \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_NUM_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --create-home --uid 1000 qsmprep
USER qsmprep
WORKDIR /tmp
ENTRYPOINT ["qsmprep"]
CMD ["--help"]
