"""What the launchers ask of a GPU (SM count, compute capability), looked up once per device: they run on every
launch, and torch.cuda.get_device_properties is not free."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def properties(device: torch.device):
    """torch.cuda.get_device_properties of a CUDA `device` (the current device when it has no index), cached."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())
