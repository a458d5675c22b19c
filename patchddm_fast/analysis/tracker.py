"""Exact live-tensor accounting of real PyTorch code on fake/meta tensors.

:class:`MemoryTracker` is a ``TorchDispatchMode``: it sees every ATen op that runs (forward,
autograd backward, optimizer, custom ops' fake implementations) *below* autograd, so it
sees the ops the device would execute, with the shapes and dtypes they would have.  For
each output whose untyped storage it has not seen before it records an allocation of
``storage.nbytes()`` bytes, and a ``weakref.finalize`` on that storage records the free
when the storage dies (PyTorch keeps a storage's Python object alive exactly as long as
the C++ storage, so the finalizer fires at the moment the device memory would be
returned to the caching allocator).  Views and in-place ops return already-seen storages
and cost nothing, exactly as on a GPU.

What it cannot see: memory a kernel allocates internally without an ATen op (cuDNN
convolution workspaces, cuBLAS workspaces); those are not part of PyTorch's allocated
bytes either, and are covered by stated constants in :mod:`.allocator`.

Besides the byte counts it keeps, for the moment of the peak, *where* the program was
(phase, the module stack from forward hooks, the autograd node running in backward) and
which live storages made up the peak, so a report can say where the bytes go.  It also
counts convolution FLOPs per phase; forward convolutions that run during backward are
activation-checkpoint recomputation.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
_HOST_CONSTANTS = (aten.lift_fresh.default, aten.lift_fresh_copy.default)

# Categories a storage can be given when it is registered or created.
WEIGHTS, GRADIENTS, OPTIMIZER, INPUTS, WEIGHT_COPIES, ACTIVATIONS = (
    "weights", "gradients", "optimizer_state", "inputs", "weight_copies", "activations")
# What the sampler allocates outside the network (conditioning, noise, x, x0, the network
# input): storages created in the phase of this name.
SAMPLER_STATE = "sampler_state"


@dataclass
class StorageRecord:
    sid: int
    nbytes: int
    host: bool
    category: Optional[str]  # None: decided after the run (gradient/optimizer state/activation)
    where: str               # module path (or autograd node) that allocated it


class MemoryTracker(TorchDispatchMode):
    """Tracks device (and offloaded host) storage bytes of everything that runs inside it.

    Use as a context manager around the code to measure; tensors that exist before it
    (parameters, inputs) must be registered with :meth:`register` so they count as live.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._ids = itertools.count()
        self.records: Dict[int, StorageRecord] = {}
        self.events: List[Tuple[str, int, int]] = []  # ("alloc"|"free", sid, nbytes), device only
        self.current = 0
        self.peak = 0
        self.peak_event = -1
        self.peak_where = ""
        self.host_current = 0
        self.host_peak = 0
        self.phase = "setup"
        self.module_stack: List[str] = []
        self._host_depth = 0
        self._closed = False
        self._backward_module = ""
        # conv FLOPs: forward convolutions in forward, in backward (= recompute), and backward convs.
        self.flops = {"forward": 0, "recompute": 0, "backward": 0}

    # ------------------------------------------------------------------ registration
    def register(self, tensors: Iterable[torch.Tensor], category: str, where: str = "") -> None:
        """Count already existing tensors (parameters, inputs) as live device storages."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), category, where or category)

    def sid_of(self, t: torch.Tensor) -> Optional[int]:
        """The id this tracker gave ``t``'s storage (None if never seen)."""
        return self._seen.get(t.untyped_storage())

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created inside live in (pinned) host memory, not on the device."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        old, self.phase = self.phase, phase
        self.module_stack.clear()
        try:
            yield
        finally:
            self.phase = old

    def close(self) -> None:
        """Stop recording frees (storages that die after the measurement do not matter)."""
        self._closed = True

    # ------------------------------------------------------------------ module attribution
    def module_hooks(self, model: torch.nn.Module) -> List[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that maintain the module stack and tag autograd nodes with modules."""
        handles = []
        for name, module in model.named_modules():
            label = name or type(module).__name__

            def pre(mod, args, label=label):
                self.module_stack.append(label)

            def post(mod, args, out, label=label):
                # always_call: also after an exception (checkpoint's early stop of recomputation)
                if label in self.module_stack:
                    del self.module_stack[self.module_stack.index(label):]
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        t.grad_fn.metadata.setdefault("patchddm_module", label)

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        return handles

    def where(self) -> str:
        if self.module_stack:
            prefix = "recompute of " if self.phase == "backward" else ""
            return prefix + self.module_stack[-1]
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            if node is not None:
                tag = node.metadata.get("patchddm_module") if hasattr(node, "metadata") else None
                if tag:
                    self._backward_module = tag
                return f"backward of {self._backward_module or '?'} ({node.name()})"
        return self.phase

    # ------------------------------------------------------------------ bookkeeping
    def _track(self, storage: torch.UntypedStorage, category: Optional[str], where: str) -> Optional[int]:
        if storage in self._seen:
            return None
        sid = next(self._ids)
        nbytes = int(storage.nbytes())
        host = self._host_depth > 0
        self._seen[storage] = sid
        self.records[sid] = StorageRecord(sid, nbytes, host, category, where)
        if host:
            self.host_current += nbytes
            self.host_peak = max(self.host_peak, self.host_current)
        else:
            self.current += nbytes
            self.events.append(("alloc", sid, nbytes))
            if self.current > self.peak:
                self.peak = self.current
                self.peak_event = len(self.events) - 1
                self.peak_where = where
        weakref.finalize(storage, self._free, sid)
        return sid

    def _free(self, sid: int) -> None:
        if self._closed:
            return
        rec = self.records[sid]
        if rec.host:
            self.host_current -= rec.nbytes
        else:
            self.current -= rec.nbytes
            self.events.append(("free", sid, rec.nbytes))

    def live_at_peak(self) -> List[int]:
        """Storage ids alive at the device peak (replaying the event list up to it)."""
        live = set()
        for kind, sid, _ in self.events[: self.peak_event + 1]:
            if kind == "alloc":
                live.add(sid)
            else:
                live.discard(sid)
        return sorted(live)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Convolution FLOPs by torch.utils.flop_counter's formulas (2 per multiply-add; backward:
        # grad input and grad weight as output_mask asks).  Not FlopCounterMode itself: it counts
        # per module, and the split needed here is per phase -- a forward convolution running
        # during backward is activation recompute -- which only this mode's phase knows.
        if func is aten.convolution.default:
            flops = flop_registry[aten.convolution](*args, out_val=out)
            self.flops["recompute" if self.phase == "backward" else "forward"] += flops
        elif func is aten.convolution_backward.default:
            self.flops["backward"] += flop_registry[aten.convolution_backward](*args, out_val=out)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in _HOST_CONSTANTS:
            # torch.tensor(python data) without a device: a CPU tensor on a GPU run too (e.g.
            # AdamW's per-parameter step counters); neither device memory nor offload.
            for t in outputs:
                self._seen.setdefault(t.untyped_storage(), -1)
            return out
        if outputs:
            where = None
            category = None
            if func is aten._to_copy.default and isinstance(args[0], torch.Tensor):
                src = self._seen.get(args[0].untyped_storage())
                if src is not None and self.records[src].category == WEIGHTS:
                    category = WEIGHT_COPIES
            for t in outputs:
                st = t.untyped_storage()
                if st in self._seen:
                    continue
                if where is None:
                    where = f"{self.where()} [{func.__name__}]"
                self._track(st, category, where)
        return out
