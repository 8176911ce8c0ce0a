"""One segment's request to one stage: the single place where stage requests are built.

Both the in-process pipeline (stages/pipeline.py) and the served synthesizer
(serving/synthesis.py) build their requests here, so the two differ only in
scheduling: the same request id, upstream output, history prompt, sampling
parameters and seed reach the same engine either way.
"""

from __future__ import annotations

import numpy as np

from .types import (
    CoarseRequest,
    CodecRequest,
    FineRequest,
    GenerationParams,
    SemanticRequest,
    StageRequest,
    VoicePrompt,
)


def stage_request(stage: str, request_id: str, upstream: np.ndarray, history: VoicePrompt | None,
                  params: GenerationParams, seed: int, segment: int = 0) -> StageRequest:
    """The request of ``stage`` for one segment.

    ``upstream`` is what the stage reads: text ids for semantic, the semantic tokens for coarse, the
    coarse codes for fine, the fine codes for codec (which takes no history, sampling or seed).
    ``segment`` is the segment's index in its request: stage queues serve lower indices first.
    """
    if stage == "semantic":
        return SemanticRequest(request_id, upstream, history, params.semantic, params.min_eos_p,
                               params.max_semantic_tokens, seed, segment)
    if stage == "coarse":
        return CoarseRequest(request_id, upstream, history, params.coarse, seed, segment)
    if stage == "fine":
        return FineRequest(request_id, upstream, history, params.fine, seed, segment)
    if stage == "codec":
        return CodecRequest(request_id, upstream, segment)
    raise ValueError(f"unknown stage {stage!r}")
