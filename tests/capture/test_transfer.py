"""Device-to-host copies behind the computation: the values of the moment they were started."""

from __future__ import annotations

import pytest
import torch

from capture.models.transfer import DeviceToHost, to_device


def test_cpu_copies_are_the_tensors_themselves():
    x = torch.arange(12.0).view(3, 4)
    resid, flag = DeviceToHost(torch.device("cpu")).start(x[:, :2], torch.tensor(True)).wait()
    assert resid.tolist() == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]] and bool(flag)
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copy_survives_freeing_and_reuse_of_its_source():
    device = torch.device("cuda")
    copies = DeviceToHost(device)
    assert copies.in_flight == 1 and copies.device == torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(2048, 2048, device=device)
    product = a @ a  # queued: the copy waits for it on its side stream
    expected = product.cpu()
    product = a @ a
    copy = copies.start(product[:, :1000], torch.stack([product.isfinite().all().long()]))
    assert all(host.is_pinned() for host in copy._tensors)  # the asynchronous path, not the blocking one
    del product  # its memory goes back to the compute stream's allocator; record_stream keeps it from reuse
    for _ in range(8):
        torch.full((2048, 2048), float("nan"), device=device)
    resid, flag = copy.wait()
    assert torch.equal(torch.from_numpy(resid), expected[:, :1000]) and int(flag[0]) == 1
    ids = to_device(torch.arange(5), device)
    assert ids.device.type == "cuda" and ids.tolist() == [0, 1, 2, 3, 4]
