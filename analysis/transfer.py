"""Host-to-device copies that do not make the host wait for the device.

A copy from pageable host memory (``tensor.to("cuda")``, ``torch.as_tensor(..., device="cuda")``) waits until every
kernel already queued on the stream has run. Per-batch index tensors made while the GPU is busy (a vision tower's
replay, the layers before an observed one) would each stall the queue; staged in pinned memory and copied
asynchronously they are not. PyTorch's caching host allocator keeps the pinned source until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (made on the host) on ``device``, without the host waiting for the device's queued work."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
