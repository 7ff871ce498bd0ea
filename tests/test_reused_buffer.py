"""ops/reused_buffer.py: a cached CPU buffer is handed out again only when nothing else holds it."""
from __future__ import annotations

import pytest
import torch

from dino_pytorch.ops import dispatch, multiview_cross_entropy, reused_buffer


@pytest.fixture
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reused_buffer, "MIN_BYTES", 0)
    monkeypatch.setattr(reused_buffer, "_CACHE", type(reused_buffer._CACHE)())


def test_a_released_buffer_is_reused_and_a_held_one_is_not(small_buffers):
    a = reused_buffer.empty((3, 5), torch.float32)
    ptr = a.data_ptr()
    b = reused_buffer.empty((3, 5), torch.float32)
    assert b.data_ptr() != ptr  # a is still held
    del a
    c = reused_buffer.empty((3, 5), torch.float32)
    assert c.data_ptr() != ptr  # b became the cached one when a was in use
    c_ptr, view = c.data_ptr(), c[1:]
    del c
    assert reused_buffer.empty((3, 5), torch.float32).data_ptr() != c_ptr  # a view of it holds it
    del view, b
    first = reused_buffer.empty((3, 5), torch.float32)
    ptr = first.data_ptr()
    del first
    again = reused_buffer.empty((3, 5), torch.float32)
    assert again.data_ptr() == ptr and again.shape == (3, 5) and again.is_contiguous()
    assert reused_buffer.empty((5, 3), torch.float32).data_ptr() != ptr  # keyed by shape
    del again
    assert reused_buffer.empty((3, 5), torch.float64).data_ptr() != ptr  # and by dtype


def test_release_and_the_size_floor(monkeypatch, small_buffers):
    t = reused_buffer.empty((4,), torch.float32)
    ptr = t.data_ptr()
    del t
    reused_buffer.release()
    assert len(reused_buffer._CACHE) == 0
    monkeypatch.setattr(reused_buffer, "MIN_BYTES", 1 << 20)
    reused_buffer.empty((4,), torch.float32)
    assert len(reused_buffer._CACHE) == 0  # small tensors are plain torch.empty
    assert ptr  # (the freed buffer was not kept)


def test_entries_are_bounded(small_buffers):
    for n in range(reused_buffer.MAX_ENTRIES + 3):
        reused_buffer.empty((n + 1,), torch.float32)
    assert len(reused_buffer._CACHE) == reused_buffer.MAX_ENTRIES


def test_a_gradient_someone_keeps_is_never_written_over(monkeypatch, small_buffers):
    monkeypatch.setattr(dispatch, "COMPILE_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * 2, 64, generator=g).requires_grad_(True)
    probs = [torch.softmax(torch.randn(2, 2, 64, generator=g) / 0.1, -1) for _ in range(3)]
    assert dispatch.loss_engine(logits) == "compiled"
    multiview_cross_entropy(logits, probs[0], 0.1).backward()
    kept = logits.grad  # the user keeps the first step's gradient
    kept_values = kept.clone()
    logits.grad = None
    multiview_cross_entropy(logits, probs[1], 0.1).backward()
    assert torch.equal(kept, kept_values) and logits.grad.data_ptr() != kept.data_ptr()
    # Once released, the next step may take the buffer again, and its values are right.
    del kept
    logits.grad = None
    multiview_cross_entropy(logits, probs[2], 0.1).backward()
    want = logits.detach().clone().requires_grad_(True)
    torch.autograd.backward(multiview_cross_entropy(want, probs[2], 0.1))
    torch.testing.assert_close(logits.grad, want.grad, rtol=0, atol=0)
    # Gradient accumulation (no zeroing between steps) adds into .grad and never aliases the cache.
    before = logits.grad.clone()
    multiview_cross_entropy(logits, probs[2], 0.1).backward()
    torch.testing.assert_close(logits.grad, 2 * before, rtol=1e-6, atol=0)
