"""Compile every Triton kernel offline for a GPU target, no GPU needed, and print what each config costs.

`python bench/compile_check.py [--full] [--kernel NAME] [--arch 90] [--jobs N] [--json PATH]`, from the repository
root, without TRITON_INTERPRET. For each kernel and each config its launcher can pick (every autotune config the
prune predicate keeps, the decoding tile, the row-kernel blocks from small to the cap), over dtypes and the
constexpr flags, it runs `triton.compile` for sm_<arch> and reports compile seconds, shared memory (bytes),
registers per thread and spilled bytes (from ptxas -v), then the configs that break a limit: shared memory over
the device's 227 KB opt-in maximum, spills, or a compile error. Launch-time specialization is mimicked: pointers
and sizes divisible by 16 carry the divisibility hint and an int equal to 1 (a contiguous last-dim stride, a GQA
group of 1) becomes a constant, as in a real launch.

The default grid takes, per (dtype, head dim), every kept config with the lightest flags and, with the heaviest
(causal, float mask, dropout), the first kept config (the one taken without autotuning) and the largest tile, and
with Gemma 2's (float mask, logit cap) and, for the dQ kernel, a learned bias's (float mask, its gradient stored)
the first kept config; --full crosses every config with every flag set (hours on two cores).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET; the interpreter compiles nothing")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention as A  # noqa: E402
from kernels import layer_norm as LN  # noqa: E402
from kernels import softmax as SM  # noqa: E402

SMEM_LIMIT = 227 * 1024  # H100: the most shared memory one block may opt in to
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
        torch.int32: "*i32"}
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ------------------------------------------------------------------------------------------------ compiling
def _source(fn, values: dict, constexprs: dict, no_specialize=()):
    """ASTSource for fn with runtime args `values` (a torch.dtype stands for a pointer to it, an int or float for
    a scalar) specialized as a launch would, and the constexprs."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, torch.dtype):
            signature[name] = _PTR[v]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, int):
            signature[name] = "fp32"
        elif v == 1 and name not in no_specialize:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and name not in no_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=consts, attrs=attrs)


def compile_one(job):
    """job: (kernel label, config label, fn name in its module, values, constexprs, num_warps, num_stages, arch[,
    other compile options, as the launcher passes them]) -> a result row."""
    label, config, (module, fn_name), values, constexprs, num_warps, num_stages, arch, *options = job
    fn = getattr(sys.modules[module], fn_name)
    no_spec = getattr(fn, "do_not_specialize", ()) or ()
    no_spec = {fn.arg_names[p] if isinstance(p, int) else p for p in no_spec}
    row = dict(kernel=label, config=config, num_warps=num_warps, num_stages=num_stages)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(_source(fn, values, constexprs, no_spec), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=num_warps, num_stages=num_stages, **(options or [{}])[0]))
    except Exception as e:  # noqa: BLE001 -- every failure is a finding to report, not to stop on
        row.update(seconds=round(time.perf_counter() - start, 1), error=f"{type(e).__name__}: {str(e)[-400:]}")
        return row
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    row.update(seconds=round(time.perf_counter() - start, 1), shared=k.metadata.shared,
               regs=int(regs.group(1)) if regs else None,
               spill=int(spill.group(1)) + int(spill.group(2)) if spill else None)
    return row


def _problems(row) -> list[str]:
    found = []
    if "error" in row:
        found.append("compile error")
    if row.get("shared", 0) > SMEM_LIMIT:
        found.append(f"shared {row['shared'] // 1024} KB > 227 KB")
    if row.get("spill"):
        found.append(f"spills {row['spill']} B")
    if row.get("regs") and row["regs"] * row["num_warps"] * 32 > 65536:
        found.append("registers exceed the SM's file")
    return found


# ------------------------------------------------------------------------------------------------ attention jobs
def _attn_scalars(dtype, D, Lq, Lk, mask_kind, B=2, H=8, Hkv=8, varlen=False, page_size=0):
    """Runtime arguments of contiguous (B, H, L, D) q, k, v, dO and outputs, and an expanded (Lq, Lk) mask; with
    varlen, packed (total, heads, D) tensors of B sequences of up to Lq and Lk rows; with a page size, k and v
    pools of pages of it (the forward's PAGED)."""
    q_strides = (0, D, H * D, 1) if varlen else (H * Lq * D, Lq * D, D, 1)
    kv_strides = (0, D, Hkv * D, 1) if varlen else (Hkv * Lk * D, Lk * D, D, 1)
    mask_strides = (0, 0, Lk, 1) if mask_kind else (0, 0, 0, 0)
    mask_dtype = {0: dtype, 1: torch.uint8, 2: dtype}[mask_kind]
    v = dict(Q=dtype, K=dtype, V=dtype, Mask=mask_dtype, DO=dtype, Max=torch.float32, LogSum=torch.float32,
             Delta=torch.float32, DQ=dtype, DMask=torch.float32, DK=dtype, DV=dtype, H=H, Hkv=Hkv, GROUP=H // Hkv,
             Lq=Lq, Lk=Lk, qk_scale=0.1, softcap=72.0, win_left=255, win_right=0, scale=0.1, dropout_p=0.1,
             dropout_scale=1.1, seed=2**40 + 7, CuQ=torch.int32, CuK=torch.int32, KEnd=torch.int32,
             total_q=B * Lq if varlen else 0, BlockTable=torch.int32, sbt=Lk // max(page_size, 1),
             page_size=max(page_size, 1), skp=page_size * Hkv * D, svp=page_size * Hkv * D)
    for prefix, strides in (("sq", q_strides), ("sk", kv_strides), ("sv", kv_strides), ("sm", mask_strides),
                            ("sdo", q_strides), ("sdq", q_strides), ("sdk", kv_strides), ("sdv", kv_strides)):
        v.update(zip((prefix + s for s in "bhmd"), strides))
        v.update(zip((prefix + s for s in "bhnd"), strides))
    return v


def _flags(dtype, D, causal, mask_kind, dropout, softcap=False, window=False, varlen=False):
    return dict(HEAD_DIM=D, HEAD_DIM_V=D, BLOCK_D=A._block(D), BLOCK_DV=A._block(D), IS_CAUSAL=causal,
                MASK_KIND=mask_kind, WINDOW=window, DROPOUT=dropout, SOFTCAP=softcap, UPCAST=False,
                IEEE=dtype == torch.float32, VARLEN=varlen)


class _Elem:
    """Stands in for a tensor in the prune predicate, which reads only element_size()."""

    def __init__(self, dtype):
        self.size = torch.tensor([], dtype=dtype).element_size()

    def element_size(self):
        return self.size


def _kept(kind, dtype, D, mask_kind, dropout):
    named = dict(Q=_Elem(dtype), BLOCK_D=A._block(D), BLOCK_DV=A._block(D), MASK_KIND=mask_kind, DROPOUT=dropout)
    return A._prune(kind)(A._configs(kind), named)


# Offline there are no tensors to check for alignment: 16-bit inputs count as descriptor-ready (aligned, sm_90).
A._tma_ok = lambda kind, named: named["Q"].element_size() == 2


# (causal, mask kind, dropout, logit cap, local window)
_FLAG_SETS = [(causal, mask, drop, cap, win) for causal in (False, True) for mask in (0, 1, 2)
              for drop in (False, True) for cap in (False, True) for win in (False, True)]
_HEAVY, _LIGHT, _CAPPED = (True, 2, True, False, False), (False, 0, False, False, False), (False, 2, False, True, False)
_BIAS = (False, 2, False, False, False)  # a learned bias (a float mask that requires grad): the dQ kernel stores dS
# a sliding window (causal, Mistral's), and one beside transformers' mask (hf.py passes both)
_WINDOWED, _WINDOWED_MASK = (True, 0, False, False, True), (False, 1, False, False, True)


def attention_jobs(full: bool, arch: int):
    jobs = []
    for dtype in DTYPES:
        for D in HEAD_DIMS:
            Lq = Lk = 1000
            for kind, fn_name in (("fwd", "_attn_fwd"), ("dkdv", "_attn_bwd_dkdv"), ("dq", "_attn_bwd_dq")):
                for flags in _FLAG_SETS:
                    causal, mask, drop, cap, win = flags
                    kept = _kept(kind, dtype, D, mask, drop)
                    largest = max(kept, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
                    for ci, c in enumerate(kept):
                        # Shared memory hardly depends on the flags, registers do: every config with the lightest
                        # flags (bf16 shares fp16's tiles: its first config only), and the heaviest flags on the
                        # first config (the one taken without autotuning) and the largest tile.
                        light = flags == _LIGHT and (ci == 0 or dtype != torch.bfloat16)
                        heavy = flags == _HEAVY and (ci == 0 or c is largest)
                        bias_grad = kind == "dq" and flags == _BIAS and ci == 0
                        extra = flags in (_CAPPED, _WINDOWED, _WINDOWED_MASK) and ci == 0
                        if not (full or light or heavy or bias_grad or extra):
                            continue
                        values = _attn_scalars(dtype, D, Lq, Lk, mask)
                        values.update(Out=dtype, out_split_stride=0, stats_split_stride=0, keys_per_split=Lk,
                                      num_splits=1)
                        const = dict(_flags(dtype, D, causal, mask, drop, cap, win), **c.kwargs)
                        if kind == "fwd":
                            const.update(PACK_GQA=False, PDL=False, PAGED=False)  # offline, every constexpr needs one
                        if kind == "dq":
                            const.update(MASK_GRAD=bias_grad)
                        label = f"attn_{kind} {_SHORT[dtype]} D{D}"
                        cfg = (f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} c{int(causal)} m{mask} "
                               f"p{int(drop)}{' cap' if cap else ''}{' win' if win else ''}"
                               f"{' dmask' if bias_grad else ''}"
                               f"{' tma' if c.kwargs.get('TMA') else ''}")
                        jobs.append((label, cfg, (A.__name__, fn_name), values, const, c.num_warps, c.num_stages,
                                     arch))
                # Packed sequences (varlen_attn), the first kept config: full attention, causal (a window), and causal
                # with Gemma 2's logit cap (Hugging Face's packed batches).
                for win, cap in ((False, False), (True, False), (True, True)):
                    c = _kept(kind, dtype, D, 0, False)[0]
                    values = _attn_scalars(dtype, D, Lq, Lk, 0, varlen=True)
                    values.update(Out=dtype, out_split_stride=0, stats_split_stride=0, keys_per_split=Lk,
                                  num_splits=1)
                    const = dict(_flags(dtype, D, False, 0, False, cap, win, varlen=True), **c.kwargs)
                    if kind == "fwd":
                        const.update(PACK_GQA=False, PDL=False, PAGED=False)
                    if kind == "dq":
                        const.update(MASK_GRAD=False)
                    cfg = (f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} varlen{' win' if win else ''}"
                           f"{' cap' if cap else ''}"
                           f"{' tma' if c.kwargs.get('TMA') else ''}")
                    jobs.append((f"attn_{kind} {_SHORT[dtype]} D{D}", cfg, (A.__name__, fn_name), values, const,
                                 c.num_warps, c.num_stages, arch))
            # Decoding: 1 or 16 queries of a GQA group of 4 heads (4 or 64 packed rows) against a long cache,
            # split over the keys, fp32 partial outputs, then the merge, its programmatic dependent from sm_90.
            pdl = arch >= 90
            for Lq_dec in (1, 16):
                for causal, mask, drop, cap, win in ([_LIGHT, _HEAVY, _CAPPED, _WINDOWED] if not full else _FLAG_SETS):
                    dc = A._decode_config(A._block(D), torch.tensor([], dtype=dtype).element_size(), 4 * Lq_dec,
                                          mask != 0 or drop)
                    values = _attn_scalars(dtype, D, Lq_dec, 8192, mask, Hkv=2)
                    values.update(Out=torch.float32, out_split_stride=2 * 8 * Lq_dec * D,
                                  stats_split_stride=16 * Lq_dec, keys_per_split=512, num_splits=16)
                    const = dict(_flags(dtype, D, causal, mask, drop, cap, win), BLOCK_M=dc["BLOCK_M"],
                                 BLOCK_N=dc["BLOCK_N"], TMA=dc["TMA"], PACK_GQA=dc["PACK_GQA"], PDL=pdl, VARLEN=False,
                                 PAGED=False)
                    jobs.append((f"attn_decode {_SHORT[dtype]} D{D}",
                                 f"M{dc['BLOCK_M']} N{dc['BLOCK_N']} c{int(causal)} m{mask} p{int(drop)}"
                                 f"{' cap' if cap else ''}{' win' if win else ''}",
                                 (A.__name__, "_attn_fwd"), values, const, dc["num_warps"], dc["num_stages"], arch))
                # Packed sequences' decoding (varlen_attn, _varlen_split_plan), causal, and from a paged KV cache
                dc = A._decode_config(A._block(D), torch.tensor([], dtype=dtype).element_size(), 4 * Lq_dec, False)
                for page_size in (0, 256):
                    values = _attn_scalars(dtype, D, Lq_dec, 8192, 0, Hkv=2, varlen=True, page_size=page_size)
                    values.update(Out=torch.float32, out_split_stride=2 * 8 * Lq_dec * D,
                                  stats_split_stride=16 * Lq_dec, keys_per_split=512, num_splits=16)
                    const = dict(_flags(dtype, D, False, 0, False, False, True, varlen=True), BLOCK_M=dc["BLOCK_M"],
                                 BLOCK_N=dc["BLOCK_N"], TMA=dc["TMA"], PACK_GQA=dc["PACK_GQA"], PDL=pdl,
                                 PAGED=page_size > 0)
                    stages = A._paged_stages(dc["num_stages"]) if page_size else dc["num_stages"]  # as varlen_forward
                    jobs.append((f"attn_decode {_SHORT[dtype]} D{D}",
                                 f"M{dc['BLOCK_M']} N{dc['BLOCK_N']} varlen win{' paged' if page_size else ''}",
                                 (A.__name__, "_attn_fwd"), values, const, dc["num_warps"], stages, arch))
            for splits, varlen in ((2, False), (128, False), (16, True)):
                values = dict(PartOut=torch.float32, PartMax=torch.float32, PartLogSum=torch.float32, Out=dtype,
                              Max=torch.float32, LogSum=torch.float32, num_splits=splits, out_split_stride=16 * D,
                              stats_split_stride=16, H=8, total_q=2)
                block_s = max(2, triton.next_power_of_2(splits))
                const = dict(HEAD_DIM_V=D, BLOCK_S=block_s, CHUNK_S=min(block_s, 16), BLOCK_DV=A._block(D),
                             VARLEN=varlen, PDL=pdl)
                jobs.append((f"attn_combine {_SHORT[dtype]} D{D}", f"S{const['BLOCK_S']}{' varlen' if varlen else ''}",
                             (A.__name__, "_attn_combine"), values, const, 4 if D >= 128 else 2, 3, arch,
                             dict(launch_pdl=pdl)))
            values = dict(O=dtype, DO=dtype, Delta=torch.float32, sob=8000 * D, soh=1000 * D, som=D, sod=1,
                          sdob=8000 * D, sdoh=1000 * D, sdom=D, sdod=1, H=8, Lq=1000)
            jobs.append((f"attn_delta {_SHORT[dtype]} D{D}", "M64", (A.__name__, "_attn_bwd_delta"), values,
                         dict(HEAD_DIM_V=D, BLOCK_M=64, BLOCK_DV=A._block(D)), 4, 3, arch))
            bm, bn, warps = (32, 32, 8) if dtype == torch.float32 else (64, 64, 4)  # as attention_weights
            for causal, mask, cap, win in ((False, 0, False, False), (True, 2, False, False), (False, 2, True, False),
                                           (False, 1, False, True)):
                values = _attn_scalars(dtype, D, 1000, 1000, mask)
                values.update(W=torch.float32)
                const = dict(_flags(dtype, D, causal, mask, False, cap, win), BLOCK_M=bm, BLOCK_N=bn)
                del const["DROPOUT"], const["HEAD_DIM_V"], const["BLOCK_DV"], const["VARLEN"]
                jobs.append((f"attn_weights {_SHORT[dtype]} D{D}",
                             f"M{bm} N{bn} c{int(causal)} m{mask}{' cap' if cap else ''}{' win' if win else ''}",
                             (A.__name__, "_attn_weights"), values, const, warps, 3, arch))
    jobs.append(("dropout_mask", "N1024", (A.__name__, "_dropout_mask_kernel"),
                 dict(Keep=torch.uint8, Lk=1000, dropout_p=0.1, seed=2**40 + 7), dict(BLOCK_N=1024), 4, 3, arch))
    return jobs


# ------------------------------------------------------------------------------------------------ row-op jobs
def row_jobs(full: bool, arch: int):
    """Every block row_config can return, up to the cap; the multi-block path at the cap (and at 64, the tests')."""
    jobs = []
    blocks = [2 ** i for i in range(0, 15)] if full else [1, 16, 128, 512, 1024, 2048, 4096, 8192, 16384]
    for dtype in DTYPES:
        t = _SHORT[dtype]
        for N in blocks + [50257]:
            block, warps, one = SM.row_config(N, SM.MAX_BLOCK_N)
            nblock = LN.norm_config(N, SM.MAX_BLOCK_N)[0]
            paths = [one] if N <= SM.MAX_BLOCK_N else [False]
            for one_block in paths:
                cfg = f"BLOCK{block} {'one' if one_block else 'multi'}"
                ncfg = f"BLOCK{nblock} {'one' if one_block else 'multi'}"
                rows = dict(stride_x=N, stride_y=N, stride_dy=N, stride_dx=N, N=N, M=4096, rows_per_program=31,
                            eps=1e-5, G=132)
                sm_fwd = "_softmax_forward_one_block" if one_block else "_softmax_forward_online"
                jobs.append((f"softmax_fwd {t}", cfg, (SM.__name__, sm_fwd), dict(rows, X=dtype, Y=dtype),
                             dict(BLOCK_N=block), warps, 3, arch))
                jobs.append((f"softmax_bwd {t}", cfg, (SM.__name__, "_softmax_backward_kernel"),
                             dict(rows, Y=dtype, DY=dtype, DX=dtype), dict(BLOCK_N=block, ONE_BLOCK=one_block),
                             warps, 3, arch))
                for affine in ((True, True), (False, False)) if full or N == 16384 else ((True, True),):
                    flags = dict(HAS_WEIGHT=affine[0], HAS_BIAS=affine[1], BLOCK_N=nblock, ONE_BLOCK=one_block,
                                 CENTER=True)
                    a = "wb" if affine[0] else "--"
                    ptrs = dict(X=dtype, Y=dtype, W=dtype, B=dtype, Mean=torch.float32, Rstd=torch.float32,
                                DY=dtype, DX=dtype, DW_partial=torch.float32, DB_partial=torch.float32)
                    jobs.append((f"layer_norm_fwd {t}", f"{ncfg} {a}", (LN.__name__, "_layer_norm_forward_kernel"),
                                 dict(rows, **ptrs), flags, warps, 3, arch))
                    no_fusion = dict(enable_fp_fusion=False)  # as the norm backward launches
                    jobs.append((f"layer_norm_bwd {t}", f"{ncfg} {a}",
                                 (LN.__name__, "_layer_norm_backward_kernel"), dict(rows, **ptrs), flags, warps, 3,
                                 arch, no_fusion))
                    rflags = dict(flags, HAS_BIAS=False, CENTER=False)  # RMSNorm: the same kernels, uncentered
                    jobs.append((f"rms_norm_fwd {t}", f"{ncfg} {a[0]}", (LN.__name__, "_layer_norm_forward_kernel"),
                                 dict(rows, **ptrs), rflags, warps, 3, arch))
                    jobs.append((f"rms_norm_bwd {t}", f"{ncfg} {a[0]}", (LN.__name__, "_layer_norm_backward_kernel"),
                                 dict(rows, **ptrs), rflags, warps, 3, arch, no_fusion))
        for block_n in (32, 64, 128):  # what sum_partials picks for 1k, 4k and 8k+ columns
            jobs.append((f"sum_partials {t}", f"G32 N{block_n}", (LN.__name__, "_sum_partials_kernel"),
                         dict(P0=torch.float32, Out0=dtype, P1=torch.float32, Out1=dtype, G=132, N=4096),
                         dict(BLOCK_G=32, BLOCK_N=block_n), 4, 3, arch))
    return jobs


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every config with every flag set")
    p.add_argument("--kernel", default="", help="only kernels whose label contains this text")
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 for H100")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles")
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args(argv)
    jobs = [j for j in attention_jobs(args.full, args.arch) + row_jobs(args.full, args.arch) if args.kernel in j[0]]
    print(f"triton {triton.__version__}, sm_{args.arch}, {len(jobs)} compiles", flush=True)
    header = f"{'kernel':<24} {'config':<30} {'warps':>5} {'stages':>6} {'s':>6} {'shared':>7} {'regs':>5} " \
             f"{'spill':>6}  problems"
    print(header, flush=True)
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(compile_one, jobs):
            rows.append(row)
            print(f"{row['kernel']:<24} {row['config']:<30} {row['num_warps']:>5} {row['num_stages']:>6} "
                  f"{row['seconds']:>6} {row.get('shared', '-'):>7} {row.get('regs') or '-':>5} "
                  f"{row.get('spill') if row.get('spill') is not None else '-':>6}  "
                  f"{'; '.join(_problems(row)) or ''}{' ' + row['error'] if 'error' in row else ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, rows=rows), f, indent=1)
    bad = [r for r in rows if _problems(r)]
    by_kernel: dict[str, float] = {}
    for r in rows:
        name = r["kernel"].split()[0]
        by_kernel[name] = by_kernel.get(name, 0.0) + r["seconds"]
    print("\ncompile seconds per kernel: " + ", ".join(f"{k} {v:.0f}" for k, v in by_kernel.items()))
    print(f"{len(bad)} of {len(rows)} configs break a limit")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
