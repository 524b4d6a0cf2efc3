"""Eager calls of the fast_attention:: ops without the dispatcher.

An eager call of a custom op goes through the dispatcher and back into Python several times (autograd, autocast,
the backend's kernel): on the CPU machine about 13 µs of the 19 µs a small fa.layer_norm takes, where torch's own
op takes 3 µs in all. The H200 machine's host is about eight times slower, and there the launch path took as long
as the kernels on 256 MB tensors (bench/results/nvidia-h200/f40f410/).

`call(op, *args)` runs the op's own Python body instead, and its registered autograd (setup_context, backward)
through one autograd.Function, when nothing needs to see the op: no torch.compile or torch.jit.trace, tensor
subclass (FakeTensor, functorch's wrappers), dispatch or function mode, functorch transform, profiler or
autocast. Otherwise the op runs exactly as registered, so torch.compile, opcheck, vmap errors and the profiler's
`fast_attention::` names are unchanged. The bodies are the same either way: the two paths give the same bits.
"""
import torch
from torch import Tensor


def direct(args) -> bool:
    """Whether a call with these arguments may skip the dispatcher (see the module's docstring)."""
    for a in args:
        if isinstance(a, Tensor) and type(a) is not Tensor and type(a) is not torch.nn.Parameter:
            return False
    return not (torch.compiler.is_compiling()
                or torch._C._get_tracing_state() is not None  # torch.jit.trace records dispatcher calls
                or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or torch._C._autograd._profiler_enabled()
                or torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


class _Registered(torch.autograd.Function):
    """A custom op's body with the autograd registered for it (register_autograd's setup_context and backward)."""

    @staticmethod
    def forward(ctx, op, *args):
        output = op._init_fn(*args)
        op._setup_context_fn(ctx, args, output)
        ctx.op = op
        return output

    @staticmethod
    def backward(ctx, *grads):
        # Under create_graph the backward op sees inputs that require grad and goes through `call` to the
        # registered op, which has no autograd: a double backward raises there, as it does on the registered path.
        return None, *ctx.op._backward_fn(ctx, *grads)


def call(op, *args):
    """op(*args) for a fast_attention:: custom op `op`: its body run directly where `direct` allows it."""
    if not direct(args) or not hasattr(op, "_init_fn"):  # CustomOpDef's fields, torch 2.4 on
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        if op._backward_fn is None:  # a backward op under create_graph: the registered op says what is missing
            return op(*args)
        return _Registered.apply(op, *args)
    return op._init_fn(*args)
