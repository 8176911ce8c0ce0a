"""The benchmark's FLOP counts (stages/flops.py): the closed forms equal the per-token sums they stand for."""

from __future__ import annotations

import numpy as np

from bark_serve.stages.flops import Shape, decode_flops, prefill_flops


def test_decode_flops_is_the_per_row_sum():
    shape = Shape(layers=12, hidden=768, vocab_out=12096)
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 64):
        positions = rng.integers(0, 1024, n).tolist()
        per_row = sum(shape.token(p + 1) + shape.head() for p in positions)  # a row at p sees p + 1 keys
        assert decode_flops(shape, positions) == per_row
        assert decode_flops(shape, iter(positions)) == per_row  # any iterable
    # 24 L C^2 per token plus 4 L C per key seen, plus the head
    assert decode_flops(shape, [0]) == 24 * 12 * 768**2 + 4 * 12 * 768 * 1 + 2 * 768 * 12096


def test_prefill_flops_counts_causal_keys():
    shape = Shape(layers=2, hidden=8, vocab_out=10)
    # a prompt of 3 tokens: its tokens see 1, 2 and 3 keys, and one logits row
    assert prefill_flops(shape, [3]) == 3 * shape.token(0) + 4 * 2 * 8 * (1 + 2 + 3) + shape.head()
    assert prefill_flops(shape, [3, 1]) == prefill_flops(shape, [3]) + prefill_flops(shape, [1])
