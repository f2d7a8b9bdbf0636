"""Does an L2 persisting window over Wu + Wd^T speed up the fused stage? (H100, 2048x5632, 131072 tokens)
    PYTHONPATH=$PWD python kernels/experiments/l2_persist.py
"""
import ctypes
import torch
from sparse_llm.kernels import twell
from sparse_llm.kernels.synthetic import make_synthetic_ffn
from triton.testing import do_bench

cuda = ctypes.CDLL("libcuda.so.1")
torch.cuda.init()
maxp = ctypes.c_int()
assert cuda.cuDeviceGetAttribute(ctypes.byref(maxp), 108, 0) == 0  # CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE
print("max persisting L2", maxp.value / 2**20, "MiB", flush=True)

class Window(ctypes.Structure):
    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t), ("hitRatio", ctypes.c_float),
                ("hitProp", ctypes.c_int), ("missProp", ctypes.c_int)]
class Value(ctypes.Union):
    _fields_ = [("window", Window), ("pad", ctypes.c_char * 64)]

def set_window(stream, base, nbytes, ratio):
    v = Value()
    v.window = Window(base, nbytes, ratio, 2 if nbytes else 0, 1)  # PERSISTING hits, STREAMING misses
    r = cuda.cuStreamSetAttribute(ctypes.c_void_p(stream.cuda_stream), 1, ctypes.byref(v))  # ACCESS_POLICY_WINDOW
    assert r == 0, r

for active in (29, 61):
    syn = make_synthetic_ffn(131072, 2048, 5632, active, 0.0, torch.bfloat16, "cuda", 0)
    x, wg = syn.x, syn.w_gate
    both = torch.empty(2, 5632, 2048, dtype=torch.bfloat16, device="cuda")
    both[0].copy_(syn.w_up)
    both[1].copy_(syn.w_down.t())
    wu, wdt = both[0], both[1]
    nbytes = both.numel() * 2
    stream = torch.cuda.current_stream()
    res = {}
    for limit_frac in (0.0, 1.0):
        if limit_frac:
            assert cuda.cuCtxSetLimit(0x06, ctypes.c_size_t(maxp.value)) == 0  # CU_LIMIT_PERSISTING_L2_CACHE_SIZE
            set_window(stream, both.data_ptr(), nbytes, min(1.0, maxp.value / nbytes))
        else:
            set_window(stream, 0, 0, 0.0)
        ts = [float(do_bench(lambda: twell.twell_ffn(x, wg, wu, None, w_down_t=wdt), warmup=10, rep=150, return_mode="median")) for _ in range(3)]
        res[limit_frac] = ts
    set_window(stream, 0, 0, 0.0)
    cuda.cuCtxResetPersistingL2Cache()
    print(active, {k: [round(t, 3) for t in v] for k, v in res.items()}, flush=True)
