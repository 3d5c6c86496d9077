"""Hidden states of every batch between the streamed engine's layers."""

from __future__ import annotations

import torch


class ActivationStore:
    """Hidden states of every batch: on the device within ``budget`` bytes, else in host memory
    (pinned for CUDA, so copies in both directions are asynchronous)."""

    def __init__(self, device: torch.device, budget: int, pin: bool):
        self.device, self.budget, self.pin = device, budget, pin
        self.used = 0
        self.total = 0
        self.on_device = 0
        self._items: dict[int, torch.Tensor] = {}

    def put(self, i: int, x: torch.Tensor) -> None:
        old = self._items.get(i)
        if old is None:
            self.total += x.nbytes
            if self.used + x.nbytes <= self.budget or self.device.type == "cpu":
                self.used += x.nbytes
                self.on_device += x.nbytes
                self._items[i] = x
            else:
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.pin)
                host.copy_(x, non_blocking=self.pin)
                self._items[i] = host
        elif old.device == x.device:
            self._items[i] = x
        else:
            old.copy_(x, non_blocking=self.pin)

    def get(self, i: int) -> torch.Tensor:
        return self._items[i].to(self.device, non_blocking=self.pin)

    def drop(self, i: int) -> None:
        self._items.pop(i, None)
