"""Useful floating-point work of the transformer stages (for the benchmark's achieved FLOP/s).

Counted per token: 2 FLOPs per multiply-add of the block weights (24·L·C² with Bark's 4x MLP),
attention scores and mixing over the visible context (4·L·C·ctx), and the LM head for the
rows whose logits are used. Padding, masked keys and dummy rows are not useful work.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    vocab_out: int

    @classmethod
    def of(cls, model) -> "Shape":
        head = model.lm_head if hasattr(model, "lm_head") else model.lm_heads[0]
        return cls(len(model.layers), head.weight.shape[1], head.weight.shape[0])

    def token(self, context: int) -> float:
        """One token through every block, attending to ``context`` keys."""
        return 24.0 * self.layers * self.hidden ** 2 + 4.0 * self.layers * self.hidden * context

    def head(self, rows: int = 1) -> float:
        return 2.0 * self.hidden * self.vocab_out * rows


def prefill_flops(shape: Shape, lengths) -> float:
    """Causal prompts of the given lengths (token t sees t + 1 keys), one logits row each."""
    return sum(shape.token(0) * n + 4.0 * shape.layers * shape.hidden * n * (n + 1) / 2 + shape.head()
               for n in lengths)


def decode_flops(shape: Shape, positions) -> float:
    """One token per row at the given positions (it sees position + 1 keys). In closed form: a decode
    step calls this on the host for every step, and a per-row sum cost about 1 µs a row."""
    positions = list(positions)
    n = len(positions)
    return n * (shape.token(0) + shape.head()) + 4.0 * shape.layers * shape.hidden * (sum(positions) + n)


def fine_flops(shape: Shape, windows: int, window_len: int, passes: int) -> float:
    """Non-causal windows: every position sees the whole window, logits at every position."""
    return windows * passes * window_len * (shape.token(window_len) + shape.head())
