"""A model of PyTorch's CUDA caching allocator, to turn live-tensor bytes into reserved bytes.

What ``nvidia-smi`` (and an out-of-memory error) sees is not the sum of live tensors but the
*segments* the caching allocator has obtained with ``cudaMalloc`` and keeps cached.  This
module replays a sequence of allocations and frees through the same rules as
``c10/cuda/CUDACachingAllocator.cpp`` (default configuration: one stream, no
``expandable_segments``, no ``max_split_size_mb``, no garbage-collection threshold):

* **rounding**: every request is rounded up to a multiple of 512 bytes (minimum 512);
  zero-byte requests allocate nothing;
* **two pools**: requests of at most 1 MiB come from the *small* pool, larger ones from the
  *large* pool;
* **segment sizes** (the ``cudaMalloc`` size when no cached block fits): 2 MiB for small
  requests; 20 MiB for requests between 1 MiB and 10 MiB; above that the request rounded up
  to a multiple of 2 MiB;
* **best fit**: a request takes the smallest free cached block of its pool that is large
  enough (ties: lowest address);
* **splitting**: the remainder of a block is split off as a new free block when it is at
  least 512 bytes (small pool) or more than 1 MiB (large pool); otherwise the whole block
  is handed out (and counts as allocated);
* **coalescing**: a freed block merges with free neighbours of the same segment;
* **no release**: segments stay reserved until an allocation would exceed ``capacity``;
  then, like the real allocator, every fully free segment is released and the allocation
  retried; if it still does not fit, the allocation fails (``oom``).

``peak_reserved`` is what ``torch.cuda.max_memory_reserved()`` reports; ``peak_allocated``
(block sizes, i.e. after rounding and unsplit remainders) is ``max_memory_allocated()``.
The process additionally holds the CUDA context (kernels, cuBLAS/cuDNN handles), which no
allocator statistic includes: see :data:`CUDA_CONTEXT_BYTES`.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

KiB = 1024
MiB = 1024 * KiB

MIN_BLOCK = 512            # kMinBlockSize: rounding granularity
SMALL_SIZE = 1 * MiB       # kSmallSize: largest request served by the small pool
SMALL_BUFFER = 2 * MiB     # kSmallBuffer: small-pool segment size
LARGE_BUFFER = 20 * MiB    # kLargeBuffer: segment size for 1..10 MiB requests
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here on, segments are the rounded request
ROUND_LARGE = 2 * MiB      # kRoundLarge

# The CUDA context of a PyTorch process on an A100/H100 with CUDA 12 and lazy module
# loading, after cuBLAS and cuDNN have been initialised: about 0.5 GiB that nvidia-smi
# shows and no allocator statistic includes.  A stated constant; `patchddm profile`
# measures the real value of a machine (NVML process memory minus reserved bytes).
CUDA_CONTEXT_BYTES = 512 * MiB


def round_size(nbytes: int) -> int:
    """The allocator's request rounding (512-byte granularity, 512 minimum)."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return MIN_BLOCK * ((nbytes + MIN_BLOCK - 1) // MIN_BLOCK)


def segment_size(rounded: int) -> int:
    """The cudaMalloc size for a rounded request that no cached block can serve."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((rounded + ROUND_LARGE - 1) // ROUND_LARGE)


@dataclass
class _Block:
    addr: int
    size: int
    segment: int
    small: bool
    allocated: bool = False
    prev: Optional["_Block"] = None
    next: Optional["_Block"] = None

    def key(self) -> Tuple[int, int]:
        return (self.size, self.addr)


class AllocatorOOM(MemoryError):
    """An allocation that does not fit into the modelled device capacity."""


@dataclass
class AllocatorStats:
    """What the model ends with (all bytes)."""

    peak_reserved: int = 0
    peak_allocated: int = 0
    reserved: int = 0
    allocated: int = 0
    segments_created: int = 0
    oom: bool = False
    oom_request: int = 0
    # Reserved bytes held by the cache at the moment allocated bytes peaked.
    reserved_at_peak_allocated: int = 0


class CachingAllocatorModel:
    """Replays malloc/free through the caching allocator's rules (see module docstring).

    ``capacity`` (bytes available to the allocator, i.e. device memory minus the CUDA
    context) is optional; without it segments are never released and an allocation never
    fails.  Handles are caller-chosen hashable ids.
    """

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity
        self._pools: Dict[bool, List[Tuple[int, int, int]]] = {True: [], False: []}  # small? -> sorted (size, addr, id)
        self._blocks: Dict[int, _Block] = {}  # id(block) -> block for free blocks in pools
        self._handles: Dict[object, _Block] = {}
        self._segments: Dict[int, int] = {}  # segment index -> size
        self._seg_first: Dict[int, _Block] = {}
        self._next_addr = 0
        self._next_seg = 0
        self.stats = AllocatorStats()

    # ------------------------------------------------------------------ pools
    def _pool_add(self, b: _Block) -> None:
        bisect.insort(self._pools[b.small], (b.size, b.addr, id(b)))
        self._blocks[id(b)] = b

    def _pool_remove(self, b: _Block) -> None:
        pool = self._pools[b.small]
        i = bisect.bisect_left(pool, (b.size, b.addr, id(b)))
        assert pool[i][2] == id(b), "allocator model: free-block index corrupted"
        del pool[i]
        del self._blocks[id(b)]

    def _best_fit(self, small: bool, size: int) -> Optional[_Block]:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        return self._blocks[pool[i][2]]

    # ------------------------------------------------------------------ segments
    def _new_segment(self, size: int, small: bool) -> _Block:
        if self.capacity is not None and self.stats.reserved + size > self.capacity:
            self._release_free_segments()
            if self.stats.reserved + size > self.capacity:
                raise AllocatorOOM(size)
        seg = self._next_seg
        self._next_seg += 1
        block = _Block(addr=self._next_addr, size=size, segment=seg, small=small)
        self._next_addr += size
        self._segments[seg] = size
        self._seg_first[seg] = block
        self.stats.reserved += size
        self.stats.segments_created += 1
        self.stats.peak_reserved = max(self.stats.peak_reserved, self.stats.reserved)
        return block

    def _release_free_segments(self) -> None:
        """What the allocator does before giving up: cudaFree every segment that is one free block."""
        for seg, first in list(self._seg_first.items()):
            if not first.allocated and first.next is None and first.prev is None:
                self._pool_remove(first)
                self.stats.reserved -= self._segments.pop(seg)
                del self._seg_first[seg]

    # ------------------------------------------------------------------ public API
    def malloc(self, handle: object, nbytes: int) -> None:
        """Allocate ``nbytes`` under ``handle``; zero bytes allocate nothing."""
        if handle in self._handles:
            raise KeyError(f"allocator model: handle {handle!r} is already allocated")
        if nbytes <= 0:
            return
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(small, size)
        if block is not None:
            self._pool_remove(block)
        else:
            block = self._new_segment(segment_size(size), small)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = _Block(addr=block.addr + size, size=remaining, segment=block.segment, small=small,
                          prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._pool_add(rest)
        block.allocated = True
        self._handles[handle] = block
        self.stats.allocated += block.size
        if self.stats.allocated > self.stats.peak_allocated:
            self.stats.peak_allocated = self.stats.allocated
            self.stats.reserved_at_peak_allocated = self.stats.reserved

    def free(self, handle: object) -> None:
        """Return ``handle``'s block to its pool, merging with free neighbours."""
        block = self._handles.pop(handle, None)
        if block is None:
            return  # zero-byte allocation
        self.stats.allocated -= block.size
        block.allocated = False
        for nb in (block.prev, block.next):
            if nb is not None and not nb.allocated:
                self._pool_remove(nb)
                if nb is block.prev:
                    nb.size += block.size
                    nb.next = block.next
                    if block.next is not None:
                        block.next.prev = nb
                    if self._seg_first.get(block.segment) is block:
                        self._seg_first[block.segment] = nb
                    block = nb
                else:
                    block.size += nb.size
                    block.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = block
        self._pool_add(block)


def replay(events: Iterable[Tuple[str, object, int]], capacity: Optional[int] = None) -> AllocatorStats:
    """Run ``("alloc", handle, nbytes)`` / ``("free", handle, 0)`` events through the model.

    With ``capacity`` the replay stops at the first allocation that cannot fit
    (``stats.oom`` set, ``stats.oom_request`` its rounded size).
    """
    model = CachingAllocatorModel(capacity)
    for kind, handle, nbytes in events:
        if kind == "alloc":
            try:
                model.malloc(handle, nbytes)
            except AllocatorOOM as exc:
                model.stats.oom = True
                model.stats.oom_request = int(exc.args[0])
                break
        elif kind == "free":
            model.free(handle)
        else:
            raise ValueError(f"allocator event kind must be 'alloc' or 'free', got {kind!r}")
    return model.stats
