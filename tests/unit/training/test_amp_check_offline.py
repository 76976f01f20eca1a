"""The GPU AMP check without its download: no training run reaches for the internet."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.unit


def test_the_amp_check_keeps_amp_and_its_gpu_list_but_opens_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ultralytics' check loads ``yolo26n.pt`` from github.com on first use (a closed-network
    review showed ``getaddrinfo('github.com', 443)`` from it under the offline environment). The
    model is on the ``meta`` device: past the CPU shortcut, as a CUDA one would be, with no GPU."""
    from training.ultralytics_ddp import _check_amp_offline

    looked_up: list[Any] = []

    def refuse(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = torch.nn.Linear(1, 1, device="meta")
    assert _check_amp_offline(model) is True  # skipped as offline: AMP stays on
    assert looked_up == []
    assert _check_amp_offline(torch.nn.Linear(1, 1)) is False  # CPU: ultralytics' own answer
