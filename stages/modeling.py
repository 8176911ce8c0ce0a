"""Bark's transformers, rewritten for serving: SDPA attention and a static, slot-indexed KV cache.

Parameter names equal those of transformers' Bark sub-models, so a state dict
read from a Hugging Face checkpoint loads as is.

How the causal models run (semantic and coarse):
- the engine owns a :class:`SlotKVCache` with one row ("slot") per request it holds;
- ``prefill`` runs a right-padded batch of whole prompts from position 0 and
  writes their keys/values into the given slots;
- ``decode`` advances slots ``0..n-1`` by one token each, every slot at its own
  position; the attention mask hides everything after each slot's position, so
  a slot never sees another request's or its own stale entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .invariance import RowLinear


class SlotKVCache:
    """Keys and values of every layer for ``n_slots`` requests. (layers, slots, heads, length, head_dim)

    Allocated for what the held requests can reach, not for the engine's capacity at the stage's
    maximum length: ``reserve(n, length)`` grows the slots (doubling, up to ``max_slots``) and the
    length (in steps of ``LENGTH_STEP``, up to ``max_len``) with a copy when a request needs more,
    and ``shrink`` gives memory back when the engine empties. So ``max_batch`` costs memory only
    when that many requests are held, and short requests make a short cache.
    """

    LENGTH_STEP = 64

    def __init__(self, n_layers: int, n_slots: int, n_heads: int, max_len: int, head_dim: int, dtype, device,
                 max_slots: int | None = None, static: bool = False):
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_len = max_len
        self.max_slots = max(max_slots or n_slots, 1)
        # static: every slot at the stage's reach from the start, never moved or freed (a captured CUDA
        # graph holds the tensors' addresses)
        self.static = static
        if static:
            n_slots = self.max_slots
        length = max_len if n_slots else 0
        self.k, self.v = self._zeros(n_slots, length), self._zeros(n_slots, length)
        self.peak_bytes, self.peak_slots = self.nbytes(), n_slots  # the most ever allocated, and its slots

    def _zeros(self, n_slots: int, length: int) -> torch.Tensor:
        return torch.zeros((self.n_layers, n_slots, self.n_heads, length, self.head_dim), dtype=self.dtype,
                           device=self.device)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_per_token(self) -> int:
        """Keys and values of one position of one slot, every layer."""
        return 2 * self.n_layers * self.n_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def reserve(self, n_slots: int, length: int) -> bool:
        """Make room for ``n_slots`` slots of ``length`` positions (keeping what is stored); True if it grew."""
        if n_slots > self.max_slots or length > self.max_len:
            raise ValueError(f"KV cache limit is {self.max_slots} slots x {self.max_len} positions")
        if n_slots <= self.n_slots and length <= self.length:
            return False
        slots = min(self.max_slots, max(n_slots, 2 * self.n_slots))
        step = self.LENGTH_STEP
        new_len = min(self.max_len, max(self.length, -(-length // step) * step))
        k, v = self._zeros(slots, new_len), self._zeros(slots, new_len)
        k[:, : self.n_slots, :, : self.length] = self.k
        v[:, : self.n_slots, :, : self.length] = self.v
        self.k, self.v = k, v
        if self.nbytes() > self.peak_bytes:
            self.peak_bytes, self.peak_slots = self.nbytes(), self.n_slots
        return True

    def shrink(self) -> None:
        """Free everything (the engine holds no request); a static cache keeps its memory."""
        if self.static:
            return
        self.k, self.v = self._zeros(0, 0), self._zeros(0, 0)

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` onto ``dst`` (the engine compacts its slots this way)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])


# Measured on an H200 (torch 2.11): cuDNN's SDPA spent 3.7 ms of host time per layer per decode step
# (86% of the step) building a graph for each new key length; flash / memory-efficient kernels do not.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class HiddenKeys(NamedTuple):
    """A decode step's mask for ``decode_attention``, built once per step for every layer: True where a
    key is *hidden* from its row (past the row's position). (n, 1, 1, S)"""

    hidden: torch.Tensor


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row: two batched GEMVs in the cache's dtype, five kernels a layer.

    q (B, H, 1, D), k and v (B, H, S, D), hidden (B, 1, 1, S) True where a key is hidden. -> (B, H, 1, D)
    The CUDA decode path (``CausalLM.gemv_decode``): the memory-efficient SDPA kernel runs one block per
    (row, head) that walks the keys in turn, which took 2.3 of a 2.4 ms step at batch 64 over 1025 keys on
    an H200, and SDPA's math path first copies K and V to float32. A decode step is bound by its kernel
    count (an H200 step at batch 64 ran 331 kernels in 1.1 ms), so: the scale goes into the query (a
    copy the matmul makes anyway; exact for Bark's head size 64), the mask comes inverted from the step,
    and the softmax reads the cache dtype's scores and accumulates in float32 inside its one kernel.
    The scores are rounded to the cache dtype by the matmul, as before; the probabilities are rounded
    to it for the second matmul, as before."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (B, H, 1, S)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, 1, D)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = hidden // n_heads
        self.att_proj = RowLinear(hidden, 3 * hidden, bias=bias)
        self.out_proj = RowLinear(hidden, hidden, bias=bias)
        # SDPA's math kernel only (stages/invariance.py: CPU's flash kernel splits a small batch's work
        # differently from a large one's, so a row's output depended on the batch)
        self.math_attention = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, mask: "torch.Tensor | HiddenKeys | None", kv: "_KVWriter | None",
                causal: bool = False) -> torch.Tensor:
        q, k, v = self.att_proj(x).split(x.shape[-1], dim=2)  # 3 x (B, T, C)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, T, D)
        if kv is not None:
            k, v = kv(k, v)  # (B, H, S, D)
        # causal (no mask): the kernel skips the blocks above the diagonal instead of masking them
        if isinstance(mask, HiddenKeys):  # a decode step on the GEMV path
            y = decode_attention(q, k, v, mask.hidden)  # (B, H, 1, D)
        elif self.math_attention:
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, D)
        elif q.is_cuda:  # not cuDNN's SDPA: it builds a graph per new shape, and decode's span grows every step
            with sdpa_kernel(_CUDA_SDPA):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(x.shape)  # (B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, hidden: int, bias: bool):
        super().__init__()
        self.in_proj = RowLinear(hidden, 4 * hidden, bias=bias)
        self.out_proj = RowLinear(4 * hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.in_proj(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, n_heads: int, bias: bool, norm_bias: bool):
        super().__init__()
        self.layernorm_1 = nn.LayerNorm(hidden, bias=norm_bias)
        self.attn = SelfAttention(hidden, n_heads, bias)
        self.layernorm_2 = nn.LayerNorm(hidden, bias=norm_bias)
        self.mlp = MLP(hidden, bias)

    def forward(self, x, mask, kv=None, causal=False):
        x = x + self.attn(self.layernorm_1(x), mask, kv, causal)
        return x + self.mlp(self.layernorm_2(x))


class _KVWriter:
    """Called by one layer's attention with its fresh keys/values; returns what to attend to."""

    def __init__(self, cache: SlotKVCache, layer: int, slots: torch.Tensor | None, positions: torch.Tensor | None,
                 span: int, at: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Prefill: ``slots`` (B,) and no positions. Decode: ``positions`` is the (n * H,) row index of each
        (slot, head)'s new entry in the cache layer viewed as (N * H * L, D) (``CausalLM.decode``), or, on
        the GEMV path, ``at`` = (slots (n,), positions (n,)) written with one ``index_put_`` each."""
        self.cache, self.layer, self.slots, self.positions, self.span = cache, layer, slots, positions, span
        self.at = at

    def __call__(self, k: torch.Tensor, v: torch.Tensor):
        ck, cv = self.cache.k[self.layer], self.cache.v[self.layer]  # (N, H, L, D)
        if self.at is not None:  # decode, GEMV path (CUDA): one kernel per tensor, from the projection's view
            rows, pos = self.at
            n = k.shape[0]
            ck[rows, :, pos] = k[:, :, 0]  # (n, H, D)
            cv[rows, :, pos] = v[:, :, 0]
            return ck[:n, :, : self.span], cv[:n, :, : self.span]
        if self.positions is None:  # prefill from position 0 into arbitrary slots
            t = k.shape[2]
            ck[self.slots, :, :t] = k
            cv[self.slots, :, :t] = v
            return k, v
        # decode: slots 0..n-1, one token each at its own position, written as rows of the flattened
        # cache (index_copy_: a row copy each; scatter_ / index_put_ over dims 0 and 2 cost 1.5-2.5 ms a
        # layer on a 2-core CPU for a 4-row step)
        n, h, _, d = k.shape
        index = self.positions  # (n * H,) rows of the (N * H * L, D) view, from CausalLM.decode
        ck.view(-1, d).index_copy_(0, index, k.reshape(n * h, d))
        cv.view(-1, d).index_copy_(0, index, v.reshape(n * h, d))
        return ck[:n, :, : self.span], cv[:n, :, : self.span]


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one of Bark's transformers, read from its sub-config in config.json.

    Field names follow transformers' BarkSubModelConfig / BarkFineConfig, so that
    ``ModelConfig.from_hf(config_dict)`` reads the checkpoint's own sub-config.
    """

    hidden_size: int
    num_heads: int
    num_layers: int
    block_size: int
    input_vocab_size: int
    output_vocab_size: int
    bias: bool = True
    n_codes_total: int = 8  # fine model only
    n_codes_given: int = 1  # fine model only
    tie_word_embeddings: bool = True  # fine model only: head i shares codebook i+n_given's embedding

    @classmethod
    def from_hf(cls, cfg: Mapping) -> "ModelConfig":
        """From a transformers sub-config dict (unknown keys, e.g. dropout, are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


class CausalLM(nn.Module):
    """Bark's GPT (semantic or coarse): weights named as transformers' BarkCausalModel."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, bias = cfg.hidden_size, cfg.bias
        self.n_heads = cfg.num_heads
        self.block_size = cfg.block_size
        self.input_embeds_layer = nn.Embedding(cfg.input_vocab_size, hidden)
        self.position_embeds_layer = nn.Embedding(cfg.block_size, hidden)
        self.layers = nn.ModuleList(Block(hidden, self.n_heads, bias, bias) for _ in range(cfg.num_layers))
        self.layernorm_final = nn.LayerNorm(hidden, bias=bias)
        self.lm_head = RowLinear(hidden, cfg.output_vocab_size, bias=False)
        # decode attention as two batched GEMVs (``decode_attention``) rather than SDPA: None = on CUDA.
        # A test sets True to run the CUDA path on CPU.
        self.gemv_decode: bool | None = None

    def _run(self, x, positions, mask, writers, last_index, causal=False):
        """The layers over x (B, T, C); logits of position ``last_index`` (B,) of each row, or of the last
        position when None (a decode step: a view, no gather). -> (B, V)"""
        x = x + self.position_embeds_layer(positions)  # (B, T, C)
        for layer, writer in zip(self.layers, writers):
            x = layer(x, mask, writer, causal)
        x = x[:, -1] if last_index is None else x[torch.arange(x.shape[0], device=x.device), last_index]  # (B, C)
        return self.lm_head(self.layernorm_final(x))  # (B, V)

    def prefill(self, embeds: torch.Tensor, lengths: torch.Tensor, cache: SlotKVCache, slots: torch.Tensor):
        """Prompts (B, T, C), right-padded to T; logits of each prompt's last token. -> (B, V)

        Plain causal attention, with no mask, padded or not: a prompt's position i < length attends to
        keys 0..i, all inside the prompt, so the padding after it is never seen by a position whose
        output counts (the padding's own outputs are dropped, and the keys and values it writes past the
        prompt are overwritten by the decode steps before any of them attends there). The causal kernel
        (flash attention on CUDA) skips the blocks above the diagonal; a (B, 1, T, T) mask would send
        every padded prefill, and so every fixed-shape one, to a masked kernel, and read no host value."""
        b, t, _ = embeds.shape
        pos = torch.arange(t, device=embeds.device)
        writers = [_KVWriter(cache, i, slots, None, t) for i in range(len(self.layers))]
        return self._run(embeds, pos[None].expand(b, t), None, writers, lengths - 1, causal=True)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotKVCache, span: int | None = None):
        """One token (n,) for each of slots 0..n-1 at its position (n,). -> logits (n, V)

        Attends to the first ``span`` cache positions (masked past each row's own): the caller's bound
        (the cache's whole length in a fixed-shape step), else read from ``positions`` (a host sync).
        The attention runs as ``decode_attention`` where ``gemv_decode`` says (None: on CUDA), else
        through SDPA.
        """
        n = tokens.shape[0]
        dev = tokens.device
        if span is None:
            span = int(positions.max().item()) + 1
        keys = torch.arange(span, device=dev)
        gemv = tokens.is_cuda if self.gemv_decode is None else self.gemv_decode
        mask: torch.Tensor | HiddenKeys
        if gemv:
            mask = HiddenKeys((keys[None, :] > positions[:, None])[:, None, None, :])  # (n, 1, 1, S)
            at = (torch.arange(n, device=dev), positions)
            writers = [_KVWriter(cache, i, None, None, span, at) for i in range(len(self.layers))]
        else:
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (n, 1, 1, S)
            heads = torch.arange(self.n_heads, device=dev)
            rows = torch.arange(n, device=dev)[:, None] * self.n_heads + heads[None, :]  # (n, H)
            index = (rows * cache.length + positions[:, None]).reshape(-1)  # (n * H,) in the flattened cache
            writers = [_KVWriter(cache, i, None, index, span) for i in range(len(self.layers))]
        x = self.input_embeds_layer(tokens)[:, None, :]  # (n, 1, C)
        return self._run(x, positions[:, None], mask, writers, None)


class FineLM(nn.Module):
    """Bark's non-causal fine model: weights named as transformers' BarkFineModel."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, bias = cfg.hidden_size, cfg.bias
        self.n_codes_total = cfg.n_codes_total
        self.n_codes_given = cfg.n_codes_given
        embeds = (nn.Embedding(cfg.input_vocab_size, hidden) for _ in range(self.n_codes_total))
        self.input_embeds_layers = nn.ModuleList(embeds)
        self.position_embeds_layer = nn.Embedding(cfg.block_size, hidden)
        # The fine model's layer norms always carry a bias (as in Bark and transformers).
        self.layers = nn.ModuleList(Block(hidden, cfg.num_heads, bias, True) for _ in range(cfg.num_layers))
        self.layernorm_final = nn.LayerNorm(hidden)
        n_heads = self.n_codes_total - self.n_codes_given
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, cfg.output_vocab_size, bias=False) for _ in range(n_heads))
        self.tied = cfg.tie_word_embeddings

    def tie_weights(self) -> None:
        """Head i predicts codebook i + n_given and shares that codebook's input embedding (as Bark does)."""
        if self.tied:
            for i, head in enumerate(self.lm_heads):
                head.weight = self.input_embeds_layers[i + self.n_codes_given].weight

    def forward(self, codes: torch.Tensor, codebook: int) -> torch.Tensor:
        """Predict codebook ``codebook`` from codebooks 0..codebook of codes (B, T, 8). -> logits (B, T, V)"""
        return self.forward_rows(codes, [codebook] * codes.shape[0])

    def forward_rows(self, codes: torch.Tensor, codebooks: list[int]) -> torch.Tensor:
        """``forward`` with a codebook per row (rows at different passes in one batch). -> logits (B, T, V)

        Row b sums the input embeddings of codebooks 0..codebooks[b] in one order (a row past its own
        codebook keeps its sum, it does not add zeros) and goes through its own head, so each row's logits
        are what it gets alone; the transformer body runs once for the whole batch."""
        lo, hi = min(codebooks), max(codebooks)
        want = torch.tensor(codebooks, device=codes.device)[:, None, None] if lo != hi else None  # (B, 1, 1)
        x = self._hidden(codes, want, lo, hi)  # (B, T, C)
        if lo == hi:
            return self.lm_heads[lo - self.n_codes_given](x)
        logits = x.new_empty((*x.shape[:2], cast(nn.Linear, self.lm_heads[0]).out_features))
        for cb in sorted(set(codebooks)):
            rows = [b for b, c in enumerate(codebooks) if c == cb]
            logits[rows] = self.lm_heads[cb - self.n_codes_given](x[rows])
        return logits

    def stacked_heads(self) -> torch.Tensor:
        """The heads' weights as one tensor (heads, V, C), for ``forward_static``."""
        return torch.stack([cast(nn.Linear, h).weight for h in self.lm_heads]).detach().clone()

    def forward_static(self, codes: torch.Tensor, codebooks: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """``forward_rows`` with the codebooks (B,) on the device and no branch on them (a CUDA graph's
        fixed shape): every row sums its embeddings up to its own codebook and takes its own head from
        ``heads`` (``stacked_heads()``). -> logits (B, T, V)"""
        x = self._hidden(codes, codebooks[:, None, None], 0, self.n_codes_total - 1)  # (B, T, C)
        w = heads.index_select(0, codebooks - self.n_codes_given)  # (B, V, C)
        return torch.bmm(x, w.transpose(1, 2))  # (B, T, V)

    def _hidden(self, codes: torch.Tensor, want: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
        """Summed input embeddings (codebooks 0..lo for every row, up to ``want`` per row beyond), then
        the transformer body. codes (B, T, 8) -> (B, T, C)"""
        x = self.input_embeds_layers[0](codes[:, :, 0])  # (B, T, C)
        for i in range(1, hi + 1):
            added = x + self.input_embeds_layers[i](codes[:, :, i])
            if i <= lo:
                x = added
            else:
                assert want is not None, "codebooks past lo need the per-row codebooks"
                x = torch.where(want >= i, added, x)
        t = codes.shape[1]
        x = x + self.position_embeds_layer(torch.arange(t, device=codes.device))[None]
        for layer in self.layers:
            x = layer(x, None)
        return self.layernorm_final(x)
