"""Run-time compilation of the CUDA sources in kernels/cuda through CuPy (NVRTC), and launches on
PyTorch's current stream.

Compiled modules are cached in-process per (device, source, defines) and on disk by CuPy in
``$CUPY_CACHE_DIR`` (default ``~/.cupy/kernel_cache``), so a second process start does not
recompile. A module can also be built ahead of time, without a GPU, by
``python -m sparse_llm.kernels.warmup`` (nvcc): its cubin in ``$SPARSE_LLM_KERNEL_CACHE`` (default
``~/.cache/sparse_llm/kernels``), named by a hash of the sources, the defines and the arch, is loaded
instead of compiling.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

CUDA_DIR = Path(__file__).resolve().parent / "cuda"


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def arch_flag(major: int, minor: int) -> str:
    """sm_90a on Hopper unlocks wgmma/setmaxnreg; other archs get their plain target."""
    suffix = "a" if (major, minor) == (9, 0) else ""
    return f"sm_{major}{minor}{suffix}"


def source_text(name: str) -> str:
    path = CUDA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {path} is missing; reinstall sparse_llm or restore kernels/cuda/")
    return path.read_text()


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_LLM_KERNEL_CACHE", "~/.cache/sparse_llm/kernels")).expanduser()


def _define_items(defines) -> tuple[tuple[str, str], ...]:
    items = defines.items() if isinstance(defines, dict) else defines
    return tuple(sorted((str(k), str(v)) for k, v in items))


def cubin_path(name: str, arch: str, defines) -> Path:
    """Where the ahead-of-time cubin of (source, defines, arch) lives; the key covers every source
    and header of kernels/cuda, so an edited kernel never loads a stale binary."""
    digest = hashlib.sha256()
    for path in sorted(CUDA_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{name}|{arch}|{_define_items(defines)}".encode())
    return kernel_cache_dir() / f"{Path(name).stem}-{arch}-{digest.hexdigest()[:24]}.cubin"


@functools.lru_cache(maxsize=None)
def _module(device_index: int, name: str, defines: tuple[tuple[str, str], ...]):
    import cupy

    major, minor = torch.cuda.get_device_capability(device_index)
    arch = arch_flag(major, minor)
    prebuilt = cubin_path(name, arch, defines)
    with cupy.cuda.Device(device_index):
        if prebuilt.is_file():
            return cupy.RawModule(path=str(prebuilt))
        options = ("-std=c++17", f"-arch={arch}", f"-I{CUDA_DIR}")
        options += tuple(f"-D{key}={value}" for key, value in defines)
        return cupy.RawModule(code=source_text(name), options=options, name_expressions=None)


def get_kernel(name: str, function: str, device: torch.device, **defines):
    """The compiled `function` of kernels/cuda/`name` for `device`, with `-DKEY=VALUE` defines."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _function(index, name, function, tuple(sorted((k, str(v)) for k, v in defines.items())))


@functools.lru_cache(maxsize=None)
def _function(device_index: int, name: str, function: str, defines: tuple[tuple[str, str], ...]):
    return _module(device_index, name, defines).get_function(function)


def device_properties(device: torch.device):
    """torch's properties of a CUDA device (SM count, L2 size, ...), read once per device."""
    return _device_properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    return torch.cuda.get_device_properties(index)


def capability_problem(major: int, minor: int) -> str | None:
    """Why a GPU of this compute capability cannot run the kernels, or None: their PTX (L2 cache hints,
    cp.async, warp reductions) needs Ampere or newer."""
    if major < 8:
        return f"the GPU has compute capability {major}.{minor} and the kernels need 8.0 or newer"
    return None


def ptr(tensor: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument (a null pointer for None)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def allow_shared_mem(kernel, shared_mem: int) -> None:
    """Raise `kernel`'s dynamic shared memory limit to `shared_mem` bytes (a driver call, made once
    per size increase); launches and occupancy queries above 48 KB need it."""
    if shared_mem > _SHARED_MEM_LIMIT.get(id(kernel), 48 * 1024):
        kernel.max_dynamic_shared_size_bytes = shared_mem
        _SHARED_MEM_LIMIT[id(kernel)] = shared_mem


def launch(kernel, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
    """Launch on torch's current stream, so kernels order with torch ops and CUDA-graph capture works."""
    allow_shared_mem(kernel, shared_mem)
    with _current_cupy_stream():
        kernel(grid, block, args, shared_mem=shared_mem)


_SHARED_MEM_LIMIT: dict[int, int] = {}  # id(kernel function) -> dynamic shared memory limit already set


def resident_blocks(kernel, threads: int, shared_mem: int = 0) -> int:
    """CTAs of `kernel` that one SM runs at once with `threads` threads and `shared_mem` bytes of
    dynamic shared memory (the driver's occupancy calculator; asked once per configuration)."""
    key = (id(kernel), threads, shared_mem)
    if key not in _RESIDENT_BLOCKS:
        from cupy.cuda import driver

        allow_shared_mem(kernel, shared_mem)
        function = getattr(kernel, "kernel", kernel)  # CuPy RawKernel -> its driver Function
        _RESIDENT_BLOCKS[key] = max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(
            function.ptr, threads, shared_mem))
    return _RESIDENT_BLOCKS[key]


_RESIDENT_BLOCKS: dict[tuple[int, int, int], int] = {}


_CUPY_STREAMS: dict[int, object] = {}  # raw cudaStream_t -> CuPy's view of it


def _current_cupy_stream():
    """CuPy's view of torch's current stream, made once per stream. The lookup goes by the raw stream
    handle (what Inductor's launchers read), since building a torch.cuda.Stream object per launch
    costs more host time than the launch itself."""
    raw = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    view = _CUPY_STREAMS.get(raw)
    if view is None:
        view = _CUPY_STREAMS[raw] = _cupy_view(torch.cuda.current_stream())
    return view


def _cupy_view(stream: torch.cuda.Stream):
    """CuPy's view of a torch stream: through the CUDA stream protocol (Stream.from_external,
    CuPy >= 14) or ExternalStream (older CuPy)."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)


def _nvcc_command(name: str, arch: str, defines, output: str) -> list[str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH; install the CUDA toolkit to compile kernels ahead of time")
    gencode = f"-gencode=arch=compute_{arch[3:]},code={arch}"
    cmd = [nvcc, "-cubin", "-std=c++17", gencode, "-Xptxas", "-v", f"-I{CUDA_DIR}", "-o", output]
    cmd += [f"-D{k}={v}" for k, v in _define_items(defines or {})]
    return cmd + [str(CUDA_DIR / name)]


def _run_nvcc(cmd: list[str], name: str, arch: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on kernels/cuda/{name} for {arch}:\n{result.stderr}")
    return result.stderr


def nvcc_compile_check(name: str, arch: str = "sm_90a", defines: dict | None = None) -> str:
    """Compile a source to a cubin with nvcc (no GPU needed); returns the ptxas resource report.

    Used by CI so that a kernel that does not compile fails without a GPU.
    """
    return _run_nvcc(_nvcc_command(name, arch, defines, "/dev/null"), name, arch)


def compile_cubin(name: str, arch: str, defines) -> Path:
    """Build the cubin that `get_kernel` will load for (name, arch, defines), with nvcc and no GPU."""
    target = cubin_path(name, arch, defines)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        _run_nvcc(_nvcc_command(name, arch, defines, str(partial)), name, arch)
        os.replace(partial, target)
    return target
