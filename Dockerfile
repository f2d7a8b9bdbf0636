# CUDA image with the project installed; kernels compile at first use through CuPy (NVRTC) and are
# cached in $CUPY_CACHE_DIR. Build: docker build -t sparse_llm .   Run: docker run --gpus all sparse_llm
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    CUPY_CACHE_DIR=/opt/cupy_cache PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/sparse_llm
COPY . .
RUN python3 -m pip install -e ".[gpu,test]"
ENTRYPOINT ["python3", "train.py"]
