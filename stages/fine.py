"""Fine stage: coarse codebooks (+ voice fine history) -> all 8 codebooks.

How this works: the non-causal fine model fills codebooks 2..7 over windows
of 1024 frames that advance by 512 (history first, padding with 1024 after,
see ``tokens.fine_plan``). One ``step`` takes the current window of every
held request, stacks them into one (B, 1024, 8) batch, and runs the six
codebook passes on it; a request leaves after its last window. Every window is
exactly 1024 long, so batches need no padding and the work is large GEMMs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import tokens as T
from .constants import BarkSpec
from .engine import EngineOptions, StageEngine, check_int_array, load_for
from .flops import Shape, fine_flops
from .modeling import FineLM, ModelConfig
from .sampling import draw_uniform, sample_rows, stage_generator
from .types import EngineResult, FineRequest
from .weights import Checkpoint


@dataclass
class _FineJob:
    request: FineRequest
    plan: T.FinePlan
    sequence: torch.Tensor  # (L, 8) on the engine's device
    generator: torch.Generator
    window: int = 0
    started: float = field(default_factory=time.perf_counter)


class FineEngine(StageEngine):
    name = "fine"

    def __init__(self, options: EngineOptions, model: FineLM, spec: BarkSpec):
        super().__init__(options)
        self.model, self.spec = model, spec
        self.shape = Shape.of(model)
        self.jobs: list[_FineJob] = []

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, options: EngineOptions) -> "FineEngine":
        cfg = ModelConfig.from_hf(ckpt.submodel_config("fine"))
        state = ckpt.state_dict("fine")
        for i in range(cfg.n_codes_total - cfg.n_codes_given):  # tied heads are not stored (or not used)
            key = f"lm_heads.{i}.weight"
            if cfg.tie_word_embeddings or key not in state:
                state[key] = state[f"input_embeds_layers.{i + cfg.n_codes_given}.weight"]
        model = load_for(options, lambda: FineLM(cfg), state)
        return cls(options, model, ckpt.spec)

    @property
    def num_active(self) -> int:
        return len(self.jobs)

    def modules_for_accounting(self):
        return [self.model]

    def admit(self, req: FineRequest) -> None:
        spec = self.spec
        codes = check_int_array("coarse_codes", req.coarse_codes, 2, 0, spec.codebook_size,
                                rows=spec.n_coarse_codebooks, min_len=0)
        fine_hist = None
        if req.voice is not None:
            fine_hist = check_int_array("voice fine_prompt", req.voice.fine, 2, 0, spec.codebook_size,
                                        rows=spec.n_fine_codebooks)
        plan = T.fine_plan(codes, fine_hist, spec)
        seq = torch.from_numpy(plan.sequence).to(self.device)
        self.jobs.append(_FineJob(req, plan, seq, stage_generator(req.seed, self.name)))

    def cancel(self, request_id: str) -> bool:
        n = len(self.jobs)
        self.jobs = [j for j in self.jobs if j.request.request_id != request_id]
        return len(self.jobs) != n

    @torch.inference_mode()
    def step(self) -> list[EngineResult]:
        if not self.jobs:
            return []
        t0 = time.perf_counter()
        spec, win = self.spec, self.spec.max_fine_input_length
        windows = [j.plan.windows[j.window] for j in self.jobs]
        batch = torch.stack([j.sequence[w.start: w.start + win] for j, w in zip(self.jobs, windows)])  # (B, 1024, 8)
        chunk = max(1, self.forward_token_budget(self.shape.hidden) // win)
        for codebook in range(spec.n_coarse_codebooks, spec.n_fine_codebooks):
            for lo in range(0, len(windows), chunk):
                logits = self.model(batch[lo: lo + chunk], codebook)[:, :, : spec.codebook_size].float()  # (b, 1024, V)
                for i in range(lo, min(lo + chunk, len(windows))):
                    job, w = self.jobs[i], windows[i]
                    rows = logits[i - lo, w.fill_from:]  # (N, 1024)
                    uniform = draw_uniform([job.generator], [rows.shape[0]], self.device)
                    batch[i, w.fill_from:, codebook] = sample_rows(rows, [job.request.sampling] * rows.shape[0],
                                                                   uniform)
        results, keep = [], []
        for i, (job, w) in enumerate(zip(self.jobs, windows)):
            job.sequence[w.start: w.start + win] = batch[i]
            job.window += 1
            if job.window < len(job.plan.windows):
                keep.append(job)
                continue
            out = T.fine_output(job.plan, job.sequence.cpu().numpy()).astype(np.int32)  # (8, T)
            results.append(EngineResult(job.request.request_id, output=out,
                                       timings={"latency_s": time.perf_counter() - job.started}))
        self.jobs = keep
        frames = float(sum(win - w.fill_from for w in windows))
        passes = spec.n_fine_codebooks - spec.n_coarse_codebooks
        self._record({"batch": float(len(windows)), "tokens": frames, "step_s": time.perf_counter() - t0,
                          "window_flops": fine_flops(self.shape, len(windows), win, passes)})
        return results
