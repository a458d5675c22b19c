"""The caching-allocator model against hand-derived numbers (rules in allocator's docstring)."""
import pytest

from patchddm_fast.analysis.allocator import CachingAllocatorModel, MiB, replay, round_size, segment_size


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert segment_size(512) == 2 * MiB and segment_size(1 * MiB) == 2 * MiB       # small pool
    assert segment_size(1 * MiB + 512) == 20 * MiB and segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB and segment_size(11 * MiB + 512) == 12 * MiB


def test_known_sequence_is_exact():
    m = CachingAllocatorModel()
    m.malloc("a", 100)              # 512 B from a new 2 MiB small segment
    assert (m.stats.allocated, m.stats.reserved) == (512, 2 * MiB)
    m.malloc("b", 3 * MiB // 2)     # new 20 MiB large segment, split: 18.5 MiB free remains
    m.malloc("c", 3 * MiB)          # from the remainder (15.5 MiB left)
    m.malloc("d", 12 * MiB)         # best fit is still that remainder (3.5 MiB left)
    assert m.stats.reserved == 22 * MiB
    assert m.stats.allocated == 512 + (3 * MiB // 2) + 3 * MiB + 12 * MiB
    m.free("c")                     # neighbours b and d are allocated: no merge
    m.malloc("e", 5 * MiB // 2)     # best fit: c's 3 MiB block; 0.5 MiB rest <= 1 MiB: not split
    assert m.stats.allocated == 512 + (3 * MiB // 2) + 3 * MiB + 12 * MiB
    m.malloc("f", 16 * MiB)         # nothing cached fits: new segment of exactly 16 MiB
    assert m.stats.reserved == 38 * MiB
    peak = 512 + (3 * MiB // 2) + 3 * MiB + 12 * MiB + 16 * MiB
    assert m.stats.peak_allocated == peak and m.stats.peak_reserved == 38 * MiB
    for h in "bed":                 # the 20 MiB segment coalesces back into one free block
        m.free(h)
    m.malloc("g", 20 * MiB)         # ... which serves a 20 MiB request without a new segment
    assert m.stats.reserved == 38 * MiB and m.stats.segments_created == 3
    m.free("f")
    m.free("g")
    assert m.stats.allocated == 512 and m.stats.reserved == 38 * MiB  # cached, not released


def test_capacity_releases_free_segments_then_fails():
    events = [("alloc", 1, 12 * MiB), ("free", 1, 0), ("alloc", 2, 20 * MiB)]
    stats = replay(events, capacity=30 * MiB)      # 12 + 20 > 30: the free 12 MiB segment is released
    assert not stats.oom and stats.reserved == 20 * MiB and stats.peak_reserved == 20 * MiB
    stats = replay(events + [("alloc", 3, 15 * MiB)], capacity=30 * MiB)  # 20 + 16 > 30, nothing to release
    assert stats.oom and stats.oom_request == 16 * MiB
    assert not replay(events + [("alloc", 3, 15 * MiB)]).oom  # unlimited capacity never fails


def test_zero_bytes_and_bad_events():
    m = CachingAllocatorModel()
    m.malloc("z", 0)
    m.free("z")
    assert m.stats.reserved == 0
    with pytest.raises(ValueError, match="alloc' or 'free"):
        replay([("grow", 1, 10)])
