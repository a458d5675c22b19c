"""Offload to (pinned) host memory: encoder skips and saved activations, with prefetch.

The U-Net keeps every encoder skip alive until the decoder consumes it, and training keeps
what backward needs until backward reaches it.  Both are *waiting*, not computing, so they
can wait in host memory.  :class:`Offload` is the handler ``UNet3D.apply_policy`` installs
for an :class:`~.policy.ExecutionPolicy` whose ``offload`` is not "none":

* ``skips``: the encoder pushes each skip to host (an asynchronous device-to-host copy on a
  side stream); the decoder fetches each one back just before the block that consumes it,
  and *prefetches* the next one while that block computes (the skip store,
  :class:`~.skips.OffloadedSkips`).
* ``all`` (training): ``skips`` plus saved-tensor hooks that move every saved activation of
  at least ``min_bytes`` to host when autograd saves it and bring it back (prefetching the
  one saved before it) when backward unpacks it.  With checkpointing the saved tensors are
  the checkpoint inputs, so the device keeps only the block being computed.

Where the bytes go is abstracted by a *store*: :class:`CudaHostStore` (pinned buffers, a copy
stream, events -- the real thing), :class:`CpuStore` (plain copies; exercises the logic on a
CPU) and :class:`SimulatedHostStore` (the memory simulator: host copies are fake tensors the
tracker books as host memory, so offloaded bytes leave device memory exactly when the
device tensor dies).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, ContextManager, List, Optional

import torch

from patchddm_fast.model.execution.policy import DEFAULT_MIN_BYTES
from patchddm_fast.model.execution.skips import OffloadedSkips

OFFLOAD_MODES = ("none", "skips", "all")


def check_offload(mode: str) -> str:
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    return mode


# ---------------------------------------------------------------------- stores
class CpuStore:
    """Host copies on a CPU-only machine: plain clones (no streams, nothing asynchronous)."""

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True)

    def fetch(self, host: torch.Tensor, device: torch.device) -> Any:
        return host.to(device, copy=True)

    def ready(self, handle: Any) -> torch.Tensor:
        """The device tensor of a finished fetch (``fetch`` returns an opaque handle)."""
        return handle

    def host_slab(self, host: torch.Tensor, sl, device: torch.device) -> torch.Tensor:
        """One slab of a host tensor on the device (for streamed skip averages)."""
        return host[sl].to(device, copy=True)


class CudaHostStore(CpuStore):
    """Pinned host buffers and a dedicated copy stream, so transfers overlap compute.

    D2H: the copy stream waits for the producer, copies into a pinned buffer and the device
    tensor is ``record_stream``-ed so its memory is not reused before the copy finished.
    H2D (prefetch): the copy runs on the copy stream; ``ready`` makes the compute stream
    wait for it and hands the tensor over to the compute stream.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)
        return host

    def fetch(self, host: torch.Tensor, device: torch.device) -> Any:
        with torch.cuda.stream(self.stream):
            dev = torch.empty(host.shape, dtype=host.dtype, device=device)
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def ready(self, handle: Any) -> torch.Tensor:
        dev, event = handle
        current = torch.cuda.current_stream(dev.device)
        current.wait_event(event)
        dev.record_stream(current)
        return dev

    def host_slab(self, host: torch.Tensor, sl, device: torch.device) -> torch.Tensor:
        self.stream.synchronize()  # the D2H copy of this skip must have finished
        return host[sl].to(device, non_blocking=True)


class SimulatedHostStore(CpuStore):
    """For the memory simulator: host copies are booked as host memory by the tracker."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        with self.tracker.host():
            host = torch.empty_like(t, memory_format=torch.contiguous_format)
            host.copy_(t.detach())
        return host

    def fetch(self, host: torch.Tensor, device: torch.device) -> Any:
        dev = torch.empty_like(host)
        dev.copy_(host)
        return dev

    def host_slab(self, host: torch.Tensor, sl, device: torch.device) -> torch.Tensor:
        dev = torch.empty_like(host[sl])
        dev.copy_(host[sl])
        return dev


def default_store(device: torch.device) -> CpuStore:
    return CudaHostStore(device) if device.type == "cuda" else CpuStore()


# ---------------------------------------------------------------------- saved-tensor offload
class _Packed:
    __slots__ = ("host", "device", "prefetched", "index", "__weakref__")

    def __init__(self, host, device, index):
        self.host, self.device, self.index, self.prefetched = host, device, index, None


class SavedTensorOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks: big saved activations wait in host memory; unpack prefetches the previous one."""

    def __init__(self, store: CpuStore, min_bytes: int = DEFAULT_MIN_BYTES):
        self.store = store
        self.min_bytes = min_bytes
        self._packed: List[weakref.ref] = []
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
            return t
        p = _Packed(self.store.to_host(t), t.device, len(self._packed))
        self._packed.append(weakref.ref(p))
        return p

    def _unpack(self, p: Any) -> torch.Tensor:
        if not isinstance(p, _Packed):
            return p
        handle = p.prefetched if p.prefetched is not None else self.store.fetch(p.host, p.device)
        p.prefetched = None
        for j in range(p.index - 1, -1, -1):  # prefetch the previously saved tensor still alive
            prev = self._packed[j]()
            if prev is not None:
                if prev.prefetched is None:
                    prev.prefetched = self.store.fetch(prev.host, prev.device)
                break
        return self.store.ready(handle)


# ---------------------------------------------------------------------- the handler
class Offload:
    """The offload handler :meth:`UNet3D.apply_policy` installs for offload "skips" or "all".

    Args:
        mode: "skips" or "all" (see module docstring).
        store: where host copies live; default: pinned memory on CUDA, clones on CPU.
        min_bytes: smallest saved activation worth offloading ("all").
    """

    def __init__(self, mode: str = "skips", store: Optional[CpuStore] = None, min_bytes: int = DEFAULT_MIN_BYTES):
        check_offload(mode)
        if mode == "none":
            raise ValueError("offload 'none' installs no handler")
        self.mode = mode
        self._store = store
        self.min_bytes = min_bytes

    def store_for(self, device: torch.device) -> CpuStore:
        if self._store is None:
            self._store = default_store(device)
        return self._store

    def skip_store(self, device: torch.device) -> OffloadedSkips:
        """A skip store that keeps the encoder's skips in host memory."""
        return OffloadedSkips(self.store_for(device), device)

    def context(self, device: torch.device) -> ContextManager:
        """What the forward runs in: saved-tensor hooks for "all" under autograd, else nothing."""
        if self.mode != "all" or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return SavedTensorOffload(self.store_for(device), self.min_bytes)
