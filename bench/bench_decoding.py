"""Decoding: a few new queries (Lq 1..16) against a long KV cache, forward only, with grouped-query attention
(Llama-style 32 query heads over 8 key/value heads, D 128). Reading the cache dominates, so GB/s is the figure
to watch (TFLOP/s is shown too). fast_attention's backends against torch SDPA (each kernel, enable_gqa=True), the
reference under torch.compile, and flash-attn / xformers when installed.

No mask: each new query attends to the whole cache (a verify step of speculative decoding would add a small
mask over the last Lq keys; the work differs by at most Lq/Lk).

The same batch packed (fa.varlen_attn: query (B * Lq, H, D), the caches (B * Lk, Hkv, D) end to end, offsets every
Lq and Lk rows), as a server batching sequences of different lengths calls it: fast_attention's packed kernels
(Triton's splitting each sequence's keys, and with num_splits=1 not), and torch's varlen_attn on a GPU; and the
caches paged (block_table: pages of PAGE_SIZE rows in a shuffled pool, as a serving engine's allocator leaves them),
which both backends' kernels read through the table.
Run alone: `python -m bench --suite decoding` or `python bench/bench_decoding.py [--quick]`.
"""
import functools
import inspect
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

# bench.harness first: on a machine without a GPU it sets TRITON_INTERPRET before triton is imported.
from bench.bench_attention import SDPA_KERNELS, attention_flops
from bench.harness import (DEVICE, Case, Check, Mode, Suite, compiled, directed, dtype_name, optional_import,
                           timed_backends, triplets)
import fast_attention as fa
from fast_attention import reference


def cases(mode: Mode) -> list:
    if mode.gpu:
        dtype, B, H, Hkv, D = torch.bfloat16, 4, 32, 8, 128
        queries = (1, 16) if mode.quick else (1, 2, 4, 8, 16)
        caches = (4096, 32768) if mode.quick else (1024, 4096, 16384, 32768)
    else:
        dtype, B, H, Hkv, D = torch.float32, 1, 8, 2, 64
        queries, caches = (1, 16), (1024, 4096)
    out = []
    for Lq in queries:
        for Lk in caches:
            # q and out are (B, H, Lq, D); k and v are (B, Hkv, Lk, D).
            moved = (2 * B * H * Lq * D + 2 * B * Hkv * Lk * D) * dtype.itemsize
            out.append(Case({"Lq": Lq, "Lk": Lk, "B": B, "H": H, "Hkv": Hkv, "D": D, "dtype": dtype_name(dtype)},
                            flops=attention_flops(B, H, Lq, Lk, D, False, "forward"), bytes=moved))
    return out


def label(p: dict) -> str:
    return f"Lq{p['Lq']} Lk{p['Lk']} B{p['B']} H{p['H']}/{p['Hkv']} D{p['D']}"


def _qkv(p: dict, layout: str = "BHLD") -> list:
    B, H, Hkv, Lq, Lk, D = p["B"], p["H"], p["Hkv"], p["Lq"], p["Lk"], p["D"]
    dtype = getattr(torch, p["dtype"])
    shapes = [(B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)]
    if layout == "BLHD":
        shapes = [(b, l, h, d) for b, h, l, d in shapes]
    return [torch.randn(s, device=DEVICE, dtype=dtype) for s in shapes]


def providers(case: Case) -> dict:
    p = case.params
    made = {}

    def run(fn, layout="BHLD"):
        def setup():
            q, k, v = _qkv(p, layout)
            return directed("forward", lambda: fn(q, k, v), ())
        return setup

    timed = timed_backends()
    for backend in timed:
        made[f"fa:{backend}"] = run(lambda q, k, v, b=backend: fa.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, backend=b))
    if {"triton", "cuda"} <= set(timed):  # backend=None: CUDA first for decoding
        made["fa:auto"] = run(lambda q, k, v: fa.scaled_dot_product_attention(q, k, v, enable_gqa=True))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(kernel):
        def attend(q, k, v):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return attend

    for short, name in SDPA_KERNELS.items():
        kernel = getattr(SDPBackend, name, None)
        if kernel is not None and (DEVICE == "cuda" or short in ("math", "flash")):
            made[f"torch.sdpa[{short}]"] = run(sdpa(kernel))
    made["compile(reference)"] = run(lambda q, k, v: compiled(reference.scaled_dot_product_attention)(
        q, k, v, enable_gqa=True))

    def packed(attend):
        def setup():
            q, k, v = (t.flatten(0, 1) for t in _qkv(p, "BLHD"))  # views: (B * L, heads, D)
            cu_q, cu_k = (_offsets(p["B"], n) for n in (p["Lq"], p["Lk"]))
            return directed("forward", lambda: attend(q, k, v, cu_q, cu_k, p["Lq"], p["Lk"]), ())
        return setup

    for backend in timed:
        if backend != "reference":  # the reference runs a packed batch one sequence at a time
            made[f"fa:{backend} packed"] = packed(functools.partial(fa.varlen_attn, enable_gqa=True,
                                                                    backend=backend))
    if "triton" in timed:
        made["fa:triton packed num_splits=1"] = packed(functools.partial(fa.varlen_attn, enable_gqa=True,
                                                                         backend="triton", num_splits=1))

    def paged_setup(backend):
        def setup():
            q, k, v = (t.flatten(0, 1) for t in _qkv(p, "BLHD"))
            k_pool, v_pool, table, used = paged(k, v, p["B"], p["Lk"])
            cu_q = _offsets(p["B"], p["Lq"])
            return directed("forward", lambda: fa.varlen_attn(q, k_pool, v_pool, cu_q, None, p["Lq"], p["Lk"],
                                                              enable_gqa=True, seqused_k=used, block_table=table,
                                                              backend=backend), ())
        return setup

    for backend in timed:
        if backend != "reference":
            made[f"fa:{backend} paged"] = paged_setup(backend)
    torch_varlen = _torch_varlen()
    if torch_varlen is not None:
        made["torch.varlen_attn"] = packed(functools.partial(torch_varlen, enable_gqa=True))

    if DEVICE == "cuda":
        flash_attn = optional_import("flash_attn")
        if flash_attn is not None:
            made["flash-attn"] = run(lambda q, k, v: flash_attn.flash_attn_func(q, k, v), "BLHD")
        xops = optional_import("xformers.ops")
        if xops is not None:
            def xformers(q, k, v):
                # xformers' grouped layout: (B, L, groups, heads per group, D), K/V broadcast within a group.
                B, Lq, H, D = q.shape
                Hkv = k.shape[2]
                q5 = q.view(B, Lq, Hkv, H // Hkv, D)
                k5, v5 = (t.unsqueeze(3).expand(-1, -1, -1, H // Hkv, -1) for t in (k, v))
                return xops.memory_efficient_attention(q5, k5, v5)
            made["xformers"] = run(xformers, "BLHD")
    return made


def _offsets(B: int, L: int) -> torch.Tensor:
    return torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=DEVICE)


def _torch_varlen():
    """torch's varlen_attn where it runs here (a GPU) and takes GQA (torch 2.10 on), else None."""
    if DEVICE != "cuda":
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "enable_gqa" in inspect.signature(varlen_attn).parameters else None


PAGE_SIZE = 16  # vLLM's default block size


def paged(k, v, B: int, Lk: int):
    """Packed caches k, v (B * Lk, Hkv, D) moved into pools of PAGE_SIZE-row pages in a shuffled order: the pools,
    the block table and seqused_k, fa.varlen_attn's arguments for them."""
    per_seq = -(-Lk // PAGE_SIZE)
    order = torch.randperm(B * per_seq, device=k.device)  # where each sequence's j-th page lands in the pool
    pools = []
    for t in (k, v):
        pages = F.pad(t.unflatten(0, (B, Lk)), (0, 0, 0, 0, 0, per_seq * PAGE_SIZE - Lk))
        pool = torch.empty((B * per_seq, PAGE_SIZE, *t.shape[1:]), dtype=t.dtype, device=t.device)
        pool[order] = pages.reshape(B * per_seq, PAGE_SIZE, *t.shape[1:])
        pools.append(pool)
    used = torch.full((B,), Lk, dtype=torch.int32, device=k.device)
    return *pools, order.view(B, per_seq).to(torch.int32), used


def paged_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend=None):
    """fa.varlen_attn with the packed caches paged (paged(): copied on every call, so for checks, not timing)."""
    k_pool, v_pool, table, used = paged(k, v, cu_k.shape[0] - 1, max_k)
    return fa.varlen_attn(q, k_pool, v_pool, cu_q, None, max_q, max_k, enable_gqa=True, seqused_k=used,
                          block_table=table, backend=backend)


def packed_attention(query, key, value, backend=None, paged=False):
    """fa.varlen_attn on a (B, H, L, D) batch packed, (B * L, H, D), or with its caches paged, and its output back as
    (B, H, Lq, D)."""
    B, _, Lq, _ = query.shape
    q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))
    attend = paged_varlen if paged else functools.partial(fa.varlen_attn, enable_gqa=True)
    out = attend(q, k, v, _offsets(B, Lq), _offsets(B, key.shape[2]), Lq, key.shape[2], backend=backend)
    return out.unflatten(0, (B, Lq)).transpose(1, 2)


def checks(mode: Mode) -> list:
    """Decoding shapes in miniature: one and a few queries against a longer, odd-sized cache, with GQA; the last
    cache is long enough (>= DECODE_MIN_LK keys) for the split-KV path with its packed GQA groups."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if mode.gpu else (torch.float16, torch.float32)
    out = []
    for dtype in dtypes:
        for B, H, Hkv, Lq, Lk, D in ((2, 4, 2, 1, 77, 32), (1, 6, 2, 5, 130, 64), (1, 8, 2, 3, 1100, 32)):
            def run(backend, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype):
                inputs = {"query": torch.randn(B, H, Lq, D, device=DEVICE, dtype=dtype),
                          "key": torch.randn(B, Hkv, Lk, D, device=DEVICE, dtype=dtype),
                          "value": torch.randn(B, Hkv, Lk, D, device=DEVICE, dtype=dtype)}
                return triplets(
                    lambda **t: fa.scaled_dot_product_attention(**t, enable_gqa=True, backend=backend),
                    lambda **t: F.scaled_dot_product_attention(**t, enable_gqa=True),
                    lambda **t: reference.scaled_dot_product_attention(**t, enable_gqa=True), inputs, grad=False)
            out.append(Check(f"decode {dtype_name(dtype)} B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D}", run))

            def run_packed(backend, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype, paged=False):
                inputs = {"query": torch.randn(B, H, Lq, D, device=DEVICE, dtype=dtype),
                          "key": torch.randn(B, Hkv, Lk, D, device=DEVICE, dtype=dtype),
                          "value": torch.randn(B, Hkv, Lk, D, device=DEVICE, dtype=dtype)}
                return triplets(lambda **t: packed_attention(**t, backend=backend, paged=paged),
                                lambda **t: F.scaled_dot_product_attention(**t, enable_gqa=True),
                                lambda **t: reference.scaled_dot_product_attention(**t, enable_gqa=True), inputs,
                                grad=False)
            if Lk >= 1024:  # the split-KV path of packed sequences
                out.append(Check(f"decode packed {dtype_name(dtype)} B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D}",
                                 run_packed))
                out.append(Check(f"decode paged {dtype_name(dtype)} B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D}",
                                 functools.partial(run_packed, paged=True)))
    return out


SUITE = Suite(
    name="decoding",
    title="Decoding attention: Lq new queries against a KV cache of Lk (forward, GQA)",
    metric="GB/s",
    convention="bytes: q, k, v read once and out written once; FLOPs: 4*B*H*Lq*Lk*D",
    label=label,
    cases=cases,
    providers=providers,
    checks=checks,
    x="Lk",
    panels=("Lq",),
)

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "decoding", *sys.argv[1:]]))
