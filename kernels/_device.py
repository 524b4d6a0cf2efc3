"""What the launchers ask on every launch, made cheap: a GPU's properties (SM count, compute capability), looked up
once per device, since torch.cuda.get_device_properties is not free; and the integer helpers `cdiv` and
`next_power_of_2`, which triton (3.6, 3.9) defines as constexpr_functions whose wrapper costs about 1.5 µs a host
call on the CPU machine, against 0.03 µs for the plain arithmetic (a decoding call made a dozen such calls)."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def properties(device: torch.device):
    """torch.cuda.get_device_properties of a CUDA `device` (the current device when it has no index), cached."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), as triton.cdiv."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
