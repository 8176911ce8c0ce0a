"""Codec stage: 8 EnCodec codebooks -> 24 kHz waveform.

How this works: transformers' EnCodec quantizer turns the codes into
embeddings and its decoder into audio; only ``codec_model.quantizer.*`` and
``codec_model.decoder.*`` are read (no encoder). The 24 kHz decoder is causal
(causal convolutions, a unidirectional LSTM), so requests of different lengths
decode together right-padded and each is cut to its own length: the padding
never reaches earlier samples.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .constants import BarkSpec
from .engine import EngineOptions, StageEngine, check_int_array, load_for
from .types import CodecRequest, EngineResult
from .weights import Checkpoint, CheckpointError

_LEGACY_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


class _Codec(torch.nn.Module):
    """The decoding half of transformers' EncodecModel, named as in its state dict."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.encodec.modeling_encodec import EncodecDecoder, EncodecResidualVectorQuantizer

        self.quantizer = EncodecResidualVectorQuantizer(config)
        self.decoder = EncodecDecoder(config)
        self.hop = int(np.prod(config.upsampling_ratios))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, 8, T) -> audio (B, T * hop)"""
        emb = self.quantizer.decode(codes.transpose(0, 1))  # (B, D, T)
        return self.decoder(emb)[:, 0]  # (B, samples)


class CodecEngine(StageEngine[CodecRequest]):
    name = "codec"

    def __init__(self, options: EngineOptions, model: _Codec, spec: BarkSpec):
        super().__init__(options)
        self.model, self.spec = model, spec
        self.pending: list[CodecRequest] = []

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, options: EngineOptions) -> "CodecEngine":
        from transformers import EncodecConfig

        config = EncodecConfig(**ckpt.submodel_config("codec"))
        if config.use_causal_conv is not True:
            raise CheckpointError("bark-serve batches codec decodes and needs EnCodec's causal 24 kHz decoder")
        state = {}
        for key, value in ckpt.state_dict("codec").items():
            if key.startswith(("quantizer.", "decoder.")):
                head, _, leaf = key.rpartition(".")
                state[f"{head}.{_LEGACY_WEIGHT_NORM[leaf]}" if leaf in _LEGACY_WEIGHT_NORM else key] = value
        model = load_for(options, lambda: _Codec(config), state,
                            on_meta=False)
        return cls(options, model, ckpt.spec)

    @property
    def num_active(self) -> int:
        return len(self.pending)

    def modules_for_accounting(self):
        return [self.model]

    def expected_steps(self, request: CodecRequest) -> int:
        return int(request.fine_codes.shape[-1])  # one step each; longest first groups like lengths in a decode

    def admit(self, req: CodecRequest) -> None:
        check_int_array("fine_codes", req.fine_codes, 2, 0, self.spec.codebook_size, rows=self.spec.n_fine_codebooks,
                        min_len=0)
        self.pending.append(req)

    def cancel(self, request_id: str) -> bool:
        n = len(self.pending)
        self.pending = [r for r in self.pending if r.request_id != request_id]
        return len(self.pending) != n

    @torch.inference_mode()
    def step(self) -> list[EngineResult]:
        if not self.pending:
            return []
        t0 = time.perf_counter()
        reqs, self.pending = self.pending, []
        lengths = [r.fine_codes.shape[1] for r in reqs]
        results = [EngineResult(r.request_id, output=np.zeros((0,), dtype=np.float32)) for r in reqs]
        todo = [i for i, n in enumerate(lengths) if n > 0]
        if todo:
            t_max = max(lengths[i] for i in todo)
            codes = torch.zeros((len(todo), self.spec.n_fine_codebooks, t_max), dtype=torch.long)
            for row, i in enumerate(todo):
                codes[row, :, : lengths[i]] = torch.from_numpy(reqs[i].fine_codes.astype(np.int64))
            audio = self.model(codes.to(self.device)).float().cpu().numpy()  # (B, t_max * hop)
            for row, i in enumerate(todo):
                results[i].output = audio[row, : lengths[i] * self.model.hop].copy()
        self._record({"batch": float(len(reqs)), "tokens": float(sum(lengths)), "step_s": time.perf_counter() - t0})
        return results
