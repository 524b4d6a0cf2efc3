"""Run every CUDA kernel of fast_attention._C once on small shapes, for compute-sanitizer (see csrc/README.md):

    compute-sanitizer --tool memcheck  python csrc/sanitize.py
    compute-sanitizer --tool racecheck python csrc/sanitize.py
    compute-sanitizer --tool initcheck python csrc/sanitize.py
    compute-sanitizer --tool synccheck python csrc/sanitize.py
    compute-sanitizer --tool racecheck python csrc/sanitize.py attention decoding   (some groups only)

Shapes are small (the sanitizer slows kernels 10-100x) but cover every code path: misaligned rows (odd widths),
rows past one block's registers (multi-block softmax, chunked norms), partial tiles, causal, bool and additive
masks with a fully masked row, GQA, strided inputs, every head dim and both attention dtypes, dropout, the logit
cap, local windows, decoding's split-KV kernel and merge, and packed sequences.
It also checks each result against the reference loosely, so a sanitizer-clean but wrong kernel still shows: every
check runs, and the exit status is 1 if any was off.
"""
import itertools
import sys

import torch

from fast_attention import _C, reference

failed = []


def check(name, ours, ref, tol):
    err = (ours.double() - ref.double()).nan_to_num(0.0).abs().max().item()
    bound = tol * max(1.0, ref.double().nan_to_num(0.0).abs().max().item())
    nan = bool(ours.isnan().any() and not ref.isnan().any())
    verdict = "FAIL" if err > bound or nan else "ok"
    print(f"{name:55s} max |err| {err:.2e} (bound {bound:.1e}){' NaN' if nan else ''} {verdict}")
    if verdict == "FAIL":
        failed.append(name)


def rows():
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        for cols in (1, 37, 1003, 1024, 20000):  # 1024: the fused norm backward; 20000 x fp32 > one block's registers
            x = torch.randn(5, cols, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            # parameters in float32 (read as float32), or for 16-bit rows in their dtype (read as they are)
            pdtype = torch.float32 if cols % 2 else dtype
            w, b = torch.randn(cols, device="cuda", dtype=pdtype), torch.randn(cols, device="cuda", dtype=pdtype)
            y = _C.softmax_forward(x)
            check(f"softmax fwd {dtype} {cols}", y, torch.softmax(x.double(), -1), tol)
            check(f"softmax bwd {dtype} {cols}", _C.softmax_backward(y, dy), reference.softmax_backward(
                y.double(), dy.double()), tol)
            out, mean, rstd = _C.layer_norm_forward(x, w, b, 1e-5)
            check(f"layer_norm fwd {dtype} {cols}", out, reference.layer_norm(x.double(), (cols,), w.double(),
                                                                             b.double()), tol * 10)
            dx, dw, db = _C.layer_norm_backward(dy, x, w, mean, rstd, True)
            rdx, rdw, rdb = reference.layer_norm_backward(dy.double(), x.double(), w.double(), mean.double(),
                                                          rstd.double(), True)
            check(f"layer_norm bwd dx {dtype} {cols}", dx, rdx, tol * 10)
            check(f"layer_norm bwd dw {dtype} {cols}", dw, rdw, tol * 10)
            check(f"layer_norm bwd db {dtype} {cols}", db, rdb, tol * 10)
            out, rstd = _C.rms_norm_forward(x, w, 1e-6)
            check(f"rms_norm fwd {dtype} {cols}", out, reference.rms_norm(x.double(), (cols,), w.double(), 1e-6),
                  tol * 10)
            dx, dw = _C.rms_norm_backward(dy, x, None, rstd)
            check(f"rms_norm bwd dx {dtype} {cols}", dx, reference.rms_norm_backward(
                dy.double(), x.double(), None, rstd.double())[0], tol * 10)
            dx, dw = _C.rms_norm_backward(dy, x, w, rstd)
            rdx, rdw = reference.rms_norm_backward(dy.double(), x.double(), w.double(), rstd.double())
            check(f"rms_norm bwd dx (weight) {dtype} {cols}", dx, rdx, tol * 10)
            check(f"rms_norm bwd dw {dtype} {cols}", dw, rdw, tol * 10)


def attention():
    for dtype in (torch.float16, torch.bfloat16):
        for E in _C.head_dims:
            for causal, mask_kind in ((False, None), (True, None), (False, "bool"), (False, "float")):
                # Lk = 130: three key tiles (the last partial), so the loops reuse shared memory across
                # iterations (racecheck), rescale the online softmax, and causal skips key tiles.
                B, H, Hkv, Lq, Lk = 1, 4, 2, 70, 130
                q = torch.randn(B, Lq, H, E, device="cuda", dtype=dtype).transpose(1, 2)  # strided
                k = torch.randn(B, Hkv, Lk, E, device="cuda", dtype=dtype)
                v = torch.randn(B, Hkv, Lk, E, device="cuda", dtype=dtype)
                mask = None
                if mask_kind == "bool":
                    mask = torch.rand(B, 1, Lq, Lk, device="cuda") > 0.5
                    mask[:, :, 1] = False  # a fully masked row
                elif mask_kind == "float":
                    mask = torch.randn(B, 1, 1, Lk, device="cuda", dtype=dtype)
                mask4 = None if mask is None else mask.expand(B, H, Lq, Lk)
                scale = E ** -0.5
                out, stats = _C.attention_forward(q, k, v, mask4, causal, scale)
                rm = mask4 if mask4 is None or mask4.dtype == torch.bool else mask4.double()
                ref, _ = reference.attention_forward(q.double(), k.double(), v.double(), rm, causal, scale, 0.0, 0)
                tag = f"attention {dtype} E={E} causal={causal} mask={mask_kind}"
                check(f"{tag} fwd", out, ref, 3e-2)
                dout = torch.randn_like(out)
                grads = _C.attention_backward(dout, q, k, v, out, stats, mask4, causal, scale)
                rgrads = reference.attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                                      out.double(), stats.double(), rm, causal, scale, 0.0, 0)
                for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
                    check(f"{tag} {name}", g, r, 5e-2)
                weights = _C.attention_weights(q, k, stats, mask4, causal, scale)
                check(f"{tag} weights", weights, reference.attention_weights(
                    q.double(), k.double(), stats.double(), rm, causal, scale), 1e-2)


def decoding():
    """The split-KV decoding kernel and its merge: 1024 keys and more, a GQA group packed into one block's rows (8
    heads x 3 queries: two warps sharing each K and V tile), a partial last key tile, a bool mask with a fully
    masked row."""
    for dtype in (torch.float16, torch.bfloat16):
        for E in _C.head_dims:
            B, H, Hkv, Lq, Lk = 2, 8, 1, 3, 1100
            q = torch.randn(B, H, Lq, E, device="cuda", dtype=dtype)
            k, v = (torch.randn(B, Hkv, Lk, E, device="cuda", dtype=dtype) for _ in range(2))
            mask = torch.rand(B, 1, Lq, Lk, device="cuda") > 0.3
            mask[0, :, 1] = False
            mask4 = mask.expand(B, H, Lq, Lk)
            out, stats = _C.attention_forward(q, k, v, mask4, False, E ** -0.5)
            ref, _ = reference.attention_forward(q.double(), k.double(), v.double(), mask4, False, E ** -0.5, 0.0, 0)
            check(f"decoding {dtype} E={E}", out, ref, 3e-2)


def dropout():
    """Dropout in the forward and both backward kernels, against the reference given the Triton kernels' decisions
    for the same seed (which the CUDA kernels draw too)."""
    from fast_attention.kernels import attention as triton_kernels

    for dtype in (torch.float16, torch.bfloat16):
        for E in _C.head_dims:
            B, H, Hkv, Lq, Lk, p, seed = 1, 4, 2, 70, 130, 0.3, 2**40 + 12345
            q, k, v = (torch.randn(B, h, L, E, device="cuda", dtype=dtype) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
            scale = E ** -0.5
            out, stats = _C.attention_forward(q, k, v, None, False, scale, p, seed)
            keep = triton_kernels.dropout_mask(seed, p, B, H, Lq, Lk, "cuda")
            xs = [t.double().requires_grad_() for t in (q, k, v)]
            ref = reference.scaled_dot_product_attention(*xs, dropout_p=p, enable_gqa=True, dropout_mask=keep)
            tag = f"attention dropout {dtype} E={E}"
            check(f"{tag} fwd", out, ref, 3e-2)
            dout = torch.randn_like(out)
            grads = _C.attention_backward(dout, q, k, v, out, stats, None, False, scale, p, seed)
            for name, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, xs, dout.double())):
                check(f"{tag} {name}", g, r, 5e-2)


def window_and_cap():
    """The logit cap's kernels (forward, dK/dV, dQ with the cap's slope; decoding; the weights) and a local window
    that leaves whole key and query tiles out, with GQA and rows past the keys that see none."""
    for dtype in (torch.float16, torch.bfloat16):
        for E in _C.head_dims:
            B, H, Hkv, Lq, Lk = 1, 4, 2, 150, 100
            q, k, v = (torch.randn(B, h, L, E, device="cuda", dtype=dtype) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
            scale = E ** -0.5
            for softcap, window in ((2.0, None), (0.0, (20, 3)), (1.0, (70, -1))):
                left, right = window or (-1, -1)
                out, stats = _C.attention_forward(q, k, v, None, False, scale, 0.0, 0, softcap, left, right)
                xs = [t.double().requires_grad_() for t in (q, k, v)]
                ref = reference.scaled_dot_product_attention(*xs, enable_gqa=True, softcap=softcap or None,
                                                             window_size=window)
                tag = f"attention {dtype} E={E} softcap={softcap} window={window}"
                check(f"{tag} fwd", out, ref, 3e-2)
                dout = torch.randn_like(out)
                grads = _C.attention_backward(dout, q, k, v, out, stats, None, False, scale, 0.0, 0, softcap, left,
                                              right)
                for name, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, xs, dout.double())):
                    check(f"{tag} {name}", g, r, 5e-2)
            k, v = (torch.randn(B, Hkv, 1100, E, device="cuda", dtype=dtype) for _ in range(2))
            out, _ = _C.attention_forward(q[:, :, :3], k, v, None, False, scale, 0.0, 0, 1.0)  # split-KV, capped
            ref = reference.scaled_dot_product_attention(q[:, :, :3].double(), k.double(), v.double(), enable_gqa=True,
                                                         softcap=1.0)
            check(f"decoding {dtype} E={E} softcap=1.0", out, ref, 3e-2)


def packed():
    """Packed sequences (varlen): each block on its own sequence, partial tiles, a sequence without queries and one
    without keys, Lq > Lk and Lq < Lk, GQA, causal and a window aligned bottom-right, the cap; a KV cache's used
    keys (seqused_k, forward only), also paged (block_table); decoding over packed caches (the split-KV kernel, its
    splits cut from a sliding window's span), paged too."""
    lengths_q, lengths_k = [70, 0, 3, 130, 9], [40, 5, 90, 65, 0]
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")
                  for n in (lengths_q, lengths_k))
    longest = max(lengths_q), max(lengths_k)
    for dtype in (torch.float16, torch.bfloat16):
        for E in _C.head_dims:
            q, k, v = (torch.randn(sum(n), h, E, device="cuda", dtype=dtype)
                       for n, h in ((lengths_q, 4), (lengths_k, 2), (lengths_k, 2)))
            scale = E ** -0.5
            for softcap, window in ((0.0, (-1, -1)), (0.0, (-1, 0)), (1.0, (20, 3))):
                out, stats = _C.varlen_forward(q, k, v, cu_q, cu_k, *longest, scale, softcap, *window)
                xs = [t.double().requires_grad_() for t in (q, k, v)]
                ref = reference.varlen_attn(*xs, cu_q, cu_k, scale=scale, window_size=window, enable_gqa=True,
                                            softcap=softcap or None)
                tag = f"packed {dtype} E={E} softcap={softcap} window={window}"
                check(f"{tag} fwd", out, ref, 3e-2)
                dout = torch.randn_like(out)
                grads = _C.varlen_backward(dout, q, k, v, out, stats, cu_q, cu_k, *longest, scale, softcap, *window)
                for name, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, xs, dout.double())):
                    check(f"{tag} {name}", g, r, 5e-2)
            used = torch.tensor([31, 0, 90, 1, 0], dtype=torch.int32, device="cuda")
            out, _ = _C.varlen_forward(q, k, v, cu_q, cu_k, *longest, scale, 0.0, -1, 0, used)
            ref = reference.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_k, scale=scale,
                                        window_size=(-1, 0), enable_gqa=True, seqused_k=used)
            check(f"packed {dtype} E={E} seqused_k fwd", out, ref, 3e-2)
            pool_k, pool_v, table = _paged(k, v, cu_k, page_size=16)
            out, _ = _C.varlen_forward(q, pool_k, pool_v, cu_q, cu_q, *longest, scale, 0.0, -1, 0, used, table)
            check(f"packed {dtype} E={E} paged fwd", out, ref, 3e-2)
            packed_decoding(dtype, E, scale)


def packed_decoding(dtype, E, scale):
    """packed()'s decoding calls: a few queries per sequence against 1024+ keys, one sequence without queries and
    one without keys, causal and a sliding window, in a packed cache and in pages of 16 rows."""
    lengths_q, lengths_k = [1, 4, 0, 16, 2], [1100, 1030, 1500, 1200, 0]
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")
                  for n in (lengths_q, lengths_k))
    longest = max(lengths_q), max(lengths_k)
    q, k, v = (torch.randn(sum(n), h, E, device="cuda", dtype=dtype)
               for n, h in ((lengths_q, 8), (lengths_k, 2), (lengths_k, 2)))
    used = cu_k.diff()
    pool_k, pool_v, table = _paged(k, v, cu_k, page_size=16)
    for window in ((-1, 0), (300, 0)):
        ref = reference.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_k, scale=scale, window_size=window,
                                    enable_gqa=True)
        out, _ = _C.varlen_forward(q, k, v, cu_q, cu_k, *longest, scale, 0.0, *window)
        check(f"packed decoding {dtype} E={E} window={window} fwd", out, ref, 3e-2)
        out, _ = _C.varlen_forward(q, pool_k, pool_v, cu_q, cu_q, *longest, scale, 0.0, *window, used, table)
        check(f"packed decoding {dtype} E={E} window={window} paged fwd", out, ref, 3e-2)


def _paged(k, v, cu_k, page_size):
    """Packed keys and values (total, Hkv, E), sequence b at rows cu_k[b] .., copied into pools of pages of
    page_size rows in shuffled order: (k pool, v pool (pages, page_size, Hkv, E), block table int32 (B, pages))."""
    lengths = cu_k.diff().tolist()
    counts = [-(-n // page_size) for n in lengths]
    order = torch.randperm(sum(counts) + 1).tolist()
    pools = [t.new_zeros(len(order), page_size, *t.shape[1:]) for t in (k, v)]
    table = torch.full((len(lengths), max(counts)), order[-1], dtype=torch.int32)
    for b, (start, n) in enumerate(zip(cu_k.tolist(), lengths)):
        for j in range(counts[b]):
            table[b, j] = page = order.pop(0)
            rows = min(page_size, n - j * page_size)
            for pool, t in zip(pools, (k, v)):
                pool[page, :rows] = t[start + j * page_size:start + j * page_size + rows]
    return *pools, table.to(k.device)


GROUPS = {"rows": rows, "attention": attention, "dropout": dropout, "decoding": decoding,
          "window_and_cap": window_and_cap, "packed": packed}

if __name__ == "__main__":
    names = sys.argv[1:] or list(GROUPS)  # a few groups: a racecheck of them alone fits a shorter device call
    if not set(names) <= set(GROUPS):
        sys.exit(f"usage: python csrc/sanitize.py [{' '.join(GROUPS)}] (default: all); got {' '.join(names)}")
    torch.manual_seed(0)
    for name in names:
        GROUPS[name]()
    torch.cuda.synchronize()
    print(f"every kernel ran; {len(failed)} result(s) off the reference" + "".join(f"\n  {f}" for f in failed))
    sys.exit(1 if failed else 0)
