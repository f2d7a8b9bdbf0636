# Training image: CUDA toolkit, PyTorch, CuPy and sparse_llm.
#   docker build -t sparse_llm .
#   docker run --gpus all --ipc=host -v $PWD/runs:/opt/sparse_llm/runs sparse_llm model=small
# Multi-GPU: docker run ... --entrypoint torchrun sparse_llm --standalone --nproc-per-node 8 train.py model=1b
# The CUDA kernels of the bundled model shapes are built for sm_90a (H100/H200) at build time, without a
# GPU, into $SPARSE_LLM_KERNEL_CACHE; any other shape or GPU is compiled by NVRTC on first use and cached
# in $CUPY_CACHE_DIR (mount it as a volume to keep it across containers).
# NVLink multicast (NVLS) is off as on the machines this was tested on; where the cluster allows it,
# `docker run -e NCCL_NVLS_ENABLE=1 ...` turns it back on.
FROM nvidia/cuda:12.8.1-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    CUPY_CACHE_DIR=/opt/cupy_cache \
    SPARSE_LLM_KERNEL_CACHE=/opt/sparse_llm_kernels \
    NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sparse_llm
COPY pyproject.toml README.md ./
COPY sparse_llm ./sparse_llm
COPY kernels ./kernels
RUN python3 -m pip install --no-cache-dir -e ".[gpu,test]"
COPY . .
RUN python3 -m sparse_llm.kernels.warmup --arch sm_90a --models tiny small 125m 0p5b --ffn relu_gated relu

ENTRYPOINT ["python3", "train.py"]
