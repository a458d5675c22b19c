"""Where the encoder's skips wait for the decoder: the skip stores.

The U-Net pushes every encoder output and pops them back in reverse order in the decoder.
A *skip store* is what holds them in between; every store has ``push``, ``pop`` and
``take``:

* :class:`SkipStack` -- on the device (the default);
* :class:`OffloadedSkips` -- in host memory, through a transfer store of
  :mod:`.offload` (pinned buffers on CUDA), fetching each skip back just before the block
  that consumes it and prefetching the next one while that block computes.  Under autograd
  the transfers are differentiable (:class:`_ToHost` / :class:`_ToDevice`), so a skip's
  gradient also waits in host memory until the encoder's backward needs it.

Both the network's forward (:mod:`patchddm_fast.model.unet`) and the slab-wise executor
(:mod:`.tiled`) use these stores; they live here so neither imports the other.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional

import torch


class SkipStack:
    """The encoder's skips, kept on the device (the default skip store)."""

    def __init__(self) -> None:
        self._items: List[torch.Tensor] = []

    def push(self, t: torch.Tensor) -> None:
        self._items.append(t)

    def pop(self) -> torch.Tensor:
        return self._items.pop()

    def take(self, n: int, lazy: bool) -> Iterable[torch.Tensor]:
        """The next ``n`` skips in decoder order; ``lazy``: popped one at a time as the
        decoder consumes them, so each dies right after its block (a list would keep all
        ``n`` alive until the level ends)."""
        if lazy:
            return (self.pop() for _ in range(n))
        return [self.pop() for _ in range(n)]


class _ToHost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, store):  # type: ignore[override]
        ctx.store, ctx.device = store, t.device
        return store.to_host(t)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.store.ready(ctx.store.fetch(grad, ctx.device)), None


class _ToDevice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, host, store, handle):  # type: ignore[override]
        ctx.store = store
        return store.ready(handle)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.store.to_host(grad), None, None


class OffloadedSkips(SkipStack):
    """A skip store keeping skips in host memory, prefetching one ahead.

    ``store`` is a transfer store of :mod:`.offload` (``to_host``, ``fetch``, ``ready``,
    ``host_slab``).
    """

    def __init__(self, store: Any, device: torch.device):
        self.store = store
        self.device = device
        self._host: List[torch.Tensor] = []
        self._prefetched: Optional[Any] = None  # fetch handle of self._host[-1]

    def push(self, t: torch.Tensor) -> None:
        self.device = t.device
        if torch.is_grad_enabled() and t.requires_grad:
            self._host.append(_ToHost.apply(t, self.store))
        else:
            self._host.append(self.store.to_host(t))

    def _fetch_last(self) -> Any:
        return self.store.fetch(self._host[-1].detach(), self.device)

    def pop(self) -> torch.Tensor:
        handle = self._prefetched if self._prefetched is not None else self._fetch_last()
        self._prefetched = None
        host = self._host.pop()
        if self._host:  # prefetch the next skip while the caller computes with this one
            self._prefetched = self._fetch_last()
        if torch.is_grad_enabled() and host.requires_grad:
            return _ToDevice.apply(host, self.store, handle)
        return self.store.ready(handle)

    def pop_host(self) -> torch.Tensor:
        """The next skip, left in host memory (the tiled executor streams it slab by slab)."""
        return self._host.pop()
