"""Host-to-device copies that leave the device's queue alone."""

from __future__ import annotations

import pytest
import torch

from analysis.transfer import to_device


def test_a_host_tensor_arrives_unchanged_on_the_cpu() -> None:
    """Off CUDA the copy is a plain ``to``: same values, dtype and shape, the device asked for."""
    values = torch.arange(12, dtype=torch.long).reshape(3, 4)
    moved = to_device(values, torch.device("cpu"))
    assert moved.device.type == "cpu" and moved.dtype == values.dtype and torch.equal(moved, values)
    assert torch.equal(to_device(values, "cpu"), values)  # a device given by name too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_host_tensor_staged_through_pinned_memory_arrives_unchanged_on_cuda() -> None:
    """Queued behind other work, freed on the host at once: the device still reads the values it was given."""
    device = torch.device("cuda")
    busy = torch.randn(2048, 2048, device=device)
    for _ in range(8):
        busy = busy @ busy.T / 2048  # work queued ahead of the copy
    values = torch.randint(0, 1000, (64, 651))
    expected = values.clone()
    moved = to_device(values, device)
    values.zero_()  # the host's tensor changes after the call returns; the copy was staged before
    assert torch.equal(moved.cpu(), expected)
