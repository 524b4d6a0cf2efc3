"""Backend registry and resolution.

A backend is a module with the same set of functions (the backend interface, below), each a pure function of
validated tensors. The op layer (fast_attention/ops/) calls them; nothing else does.

Backend interface (2-D row ops get contiguous (M, N) inputs; attention gets (B, H, L, D) tensors of any strides):
    softmax_forward(x) -> y
    softmax_backward(y, dy) -> dx
    layer_norm_forward(x, weight|None, bias|None, eps) -> (y, mean fp32 (M,), rstd fp32 (M,))
    layer_norm_backward(dy, x, weight|None, mean, rstd, has_bias) -> (dx, dweight|None, dbias|None)
    rms_norm_forward(x, weight|None, eps) -> (y, rstd fp32 (M,))
    rms_norm_backward(dy, x, weight|None, rstd) -> (dx, dweight|None)
    attention_forward(q, k, v, mask|None, is_causal, scale, dropout_p, seed, softcap, window)
        -> (out, stats fp32 (2, B, H, Lq))
    attention_backward(dout, q, k, v, out, stats, mask|None, is_causal, scale, dropout_p, seed, softcap, mask_grad,
                       window) -> (dq, dk, dv), and with mask_grad (dq, dk, dv, dmask fp32 (B, H, Lq, Lk))
    attention_weights(q, k, stats, mask|None, is_causal, scale, softcap, window) -> probabilities fp32 (B, H, Lq, Lk)
    varlen_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, window, softcap, seqused_k, num_splits,
                   block_table) -> (out, stats fp32 (2, H, total_q))
    varlen_backward(dout, q, k, v, out, stats, cu_seq_q, cu_seq_k, max_q, max_k, scale, window, softcap)
        -> (dq, dk, dv)
    unsupported(op, **args) -> None, or a sentence saying why this backend cannot run the call
    unavailable() -> None, or a sentence saying why this backend cannot run on this machine (optional)

`stats` are the forward's per-row softmax statistics, which its backward and weights rebuild P from: max score and
log row sum, base 2, as planes 0 and 1 (fast_attention/ops/attention.py); every backend keeps this one format.
`mask` is None, or a bool / float tensor expanded (stride 0, never copied) to (B, H, Lq, Lk). K and V may have
fewer heads than Q (grouped-query attention): H % Hkv == 0, query head h reads key head h // (H // Hkv).
`seed` is an int; the same seed gives the same dropout mask. `softcap` is 0.0 (no cap) or the cap c of the scores,
c * tanh(scale * q.k / c), applied before the mask (a backend that cannot cap says so in unsupported()). With
`mask_grad` (a float mask that requires grad) the backward also returns dS, the mask's gradient before the op sums
it over the mask's broadcast dims (a backend without it says so in unsupported(): mask_grad=True). `window` is None
or a local window (left, right): query i sees keys i - left .. i + right, a side of -1 unbounded, top-left aligned
as is_causal, on top of the mask and is_causal (a backend without windows says so in unsupported()). Learned
sinks never reach a backend: the op layer applies them around it (fast_attention/ops/attention.py).
The varlen functions take packed sequences (torch's varlen_attn): q (total_q, H, D), k (total_k, Hkv, D), v
(total_k, Hkv, Dv), sequence b at rows cu_seq_q[b] .. cu_seq_q[b + 1] - 1 of q and cu_seq_k[b] .. of k and v
(int32, B + 1), max_q and max_k the longest; out is (total_q, H, Dv), and its window aligns bottom-right in each
sequence (query i of Lq sees keys i + Lk - Lq - left .. i + Lk - Lq + right), FlashAttention's varlen convention.
seqused_k is None or int32 (B,), a KV cache's used keys: sequence b's first seqused_k[b] keys are its Lk (forward
only: the op refuses a gradient). num_splits is torch's: None (the backend's choice), 1 (never split a sequence's
keys: each output then independent of the batch, bit for bit) or n > 1; a backend that never splits ignores it.
block_table is None or int32 (B, pages per sequence), a paged KV cache (with seqused_k; forward only): k and v are
then pools of pages (pages, page_size, Hkv, .), sequence b's keys the first seqused_k[b] rows of its pages, in the
table's order, and cu_seq_k is not read.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings

import torch

# In order of preference, the fastest first: backend=None takes the first that can run the call. Triton first, as
# measured on the H200 (bench/results/nvidia-h200/e7a0888/): its attention ran at 1.2-1.4x torch's SDPA flash
# kernel forward and backward, the CUDA forward at 0.76-0.89x; at 16k columns its row ops' forward moved 88-93% of
# the copy bandwidth, the CUDA ones 64-84% (at 1k columns the two were within 5% of each other in the forward). On
# the H100 (bench/results/nvidia-h100-80gb-hbm3/05be00b/) the Triton attention forward ran at 1.4-1.8x the CUDA
# one, the Triton row ops' forward at 1.0-1.06x.
# The CUDA backend is one backend="cuda" away. The norms' backward has its own order (_BACKWARD_ORDER below), and so
# has decoding outside torch.compile (_DECODING_ORDER).
NAMES = ("triton", "cuda", "reference")

# Triton's interpreter must be chosen before triton is imported; we read the choice once, as triton does.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_MODULES = {
    "reference": "fast_attention.reference",
    "triton": "fast_attention.kernels",
    "cuda": "fast_attention.cuda_backend",
}
_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}
_default: str | None = None  # process-wide, set by a plain fa.use_backend(name) call
_scoped = threading.local()  # per thread: .names, the backends of the `with fa.use_backend(...)` blocks it is in
_lock = threading.Lock()


def _module(name: str):
    if name not in _loaded and name not in _load_errors:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = getattr(module, "unavailable", lambda: None)()
            if reason:
                raise RuntimeError(reason)
            _loaded[name] = module
        except Exception as e:  # a missing triton or an unbuilt extension: the backend is just unavailable
            _load_errors[name] = f"{type(e).__name__}: {e}"
            # say so where the backend was expected to run (a GPU, or Triton's interpreter asked for)
            if torch.cuda.is_available() or (name == "triton" and TRITON_INTERPRET):
                warnings.warn(f"fast_attention: the {name} backend is not available ({_load_errors[name]})")
    return _loaded.get(name)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        return device.type == "cuda" or TRITON_INTERPRET
    return device.type == "cuda"


def available_backends() -> list[str]:
    """Backends usable now on this machine, from "reference", "triton" and "cuda", fastest first."""
    gpu = torch.cuda.is_available()
    usable = []
    for name in NAMES:
        if name == "cuda" and not gpu:
            continue
        if name == "triton" and not (gpu or TRITON_INTERPRET):
            continue
        if _module(name) is not None:
            usable.append(name)
    return usable


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in NAMES)} or None, got {name!r}")


class use_backend:
    """Set the default backend: `fa.use_backend("triton")` for the whole process, or `with
    fa.use_backend("reference"): ...` for the calling thread until the block ends (blocks nest; other threads
    keep their own). `use_backend(None)` restores automatic choice."""

    def __init__(self, name: str | None):
        if name is not None:
            _check_name(name)
        global _default
        with _lock:
            self._previous, _default = _default, name
        self.name = name

    def __enter__(self):
        # A block is its thread's alone: take back the process-wide setting __init__ made, unless another call
        # has changed it since (as another thread's block, entering in between, may have).
        global _default
        with _lock:
            if _default == self.name:
                _default = self._previous
        if not hasattr(_scoped, "names"):
            _scoped.names = []
        _scoped.names.append(self.name)
        return self

    def __exit__(self, *exc):
        _scoped.names.pop()
        return False


def default_backend() -> str | None:
    """The backend use_backend set for this thread: its innermost `with` block's, else the process-wide one."""
    names = getattr(_scoped, "names", None)
    return names[-1] if names else _default


def resolve(op: str, backend: str | None, device: torch.device, **args) -> str:
    """The backend that runs `op` on `device`: the one asked for (or an error saying why it cannot), or the
    fastest that can."""
    asked = backend if backend is not None else default_backend()
    if asked is not None:
        _check_name(asked)
        reason = why_not(asked, op, device, **args)
        if reason is not None:
            raise (NotImplementedError if reason.startswith("unsupported:") else RuntimeError)(
                f"fast_attention.{op}: backend={asked!r} cannot run this call: {reason.removeprefix('unsupported: ')}"
            )
        return asked
    for name in _DECODING_ORDER if _decoding_call(op, **args) else NAMES:
        if why_not(name, op, device, **args) is None:
            return name
    raise AssertionError("the reference backend runs every call")


# Decoding prefers CUDA. On the H100 (bench/results/nvidia-h100-80gb-hbm3/05be00b/, 20 cases of Lq 1-16 against
# 1k-32k cached keys), every decoding call on the Triton backend was bound by its launch path: 105-473 µs a call
# (170-432 µs of host time, its two kernels launched from Python), where the CUDA backend's took 25-274 µs,
# 0.15-0.89x as long in all 20. Replayed from a CUDA graph the launch path is gone and the Triton kernels are the
# faster ones (0.39-0.94x the CUDA kernels' time): a graph's maker can ask for backend="triton". The order does not
# change inside a capture, since the eager calls that warm a graph up must compile what the capture will launch.
# Under torch.compile it stays Triton first, its graph being a candidate for CUDA-graph replay
# (mode="reduce-overhead"). The shapes are those both backends give their split-KV kernels, where the two were
# measured. Packed decoding (varlen_attention) stays Triton first: the CUDA kernels' packed split-KV path has not
# been timed against Triton's yet (bench/README.md's GPU plan: `fa:cuda packed` and `fa:cuda paged`).
_DECODING_ORDER = ("cuda", "triton", "reference")
DECODE_MAX_LQ = 16     # the bounds of kernels/attention.py and csrc/attention/decode_kernel.cuh (a test checks)
DECODE_MIN_LK = 1024


def _decoding_call(op: str, query=None, key=None, dropout_p=0.0, is_causal=False, window=None, **_) -> bool:
    """Whether an attention call is decoding (few queries, a long cache, no causal mask, no window, no dropout) on a
    GPU, outside torch.compile. (With a window the CUDA backend runs its tiled forward, Triton its split-KV one.)"""
    # is_compiling first: under torch.compile, comparing the lengths would add guards on them (a recompile when a
    # growing cache passes 1024 keys).
    return (op == "scaled_dot_product_attention" and not torch.compiler.is_compiling()
            and query.device.type == "cuda" and query.shape[-2] <= DECODE_MAX_LQ and key.shape[-2] >= DECODE_MIN_LK
            and not is_causal and window is None and dropout_p == 0.0)


# The backward of these ops prefers another order: on the H200 (bench/results/nvidia-h200/e7a0888/), the CUDA
# LayerNorm / RMSNorm backward moved 1.05-1.7x the bytes per second of the Triton one (the Triton LayerNorm backward
# spills at 16k columns), while the Triton forward was 1.03-1.4x faster than the CUDA one. backend=None therefore
# runs each direction on its fastest backend; the two share the fp32 mean / rstd contract.
_BACKWARD_ORDER = {
    "layer_norm": ("cuda", "triton", "reference"),
    "rms_norm": ("cuda", "triton", "reference"),
}


def resolve_backward(op: str, backend: str | None, forward: str, device: torch.device, **args) -> str:
    """The backend that runs `op`'s backward, after resolve() gave `forward` for its forward: the same one when a
    backend was asked for (by `backend=` or use_backend), else the fastest that can run it."""
    if backend is not None or default_backend() is not None or op not in _BACKWARD_ORDER:
        return forward
    for name in _BACKWARD_ORDER[op]:
        if why_not(name, op, device, **args) is None:
            return name
    return forward


def why_not(name: str, op: str, device: torch.device, **args) -> str | None:
    """None when backend `name` can run `op` with `args` on `device`, else the reason."""
    if not _runs_on(name, device):
        if name == "triton":
            return (f"it runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before import; "
                    f"the inputs are on {device}")
        return f"it runs on CUDA tensors and the inputs are on {device}"
    module = _module(name)
    if module is None:
        return f"it is not available here ({_load_errors.get(name)})"
    reason = module.unsupported(op, **args)
    return None if reason is None else "unsupported: " + reason


def get(name: str):
    """The backend module (after resolve() chose it)."""
    return _module(name)
