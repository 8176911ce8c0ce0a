"""Fine stage: coarse codebooks (+ voice fine history) -> all 8 codebooks.

How this works: the non-causal fine model fills codebooks 2..7 over windows
of 1024 frames that advance by 512 (history first, padding with 1024 after,
see ``tokens.fine_plan``), one codebook pass at a time. One ``step`` is one
pass: it stacks the current window of every held request into one
(B, 1024, 8) batch and fills each row's next codebook, whatever pass each row
is at (rows at different passes share the transformer body; only the summed
input embeddings and the head differ, see ``FineLM.forward_rows``). So a
request that arrives while others are mid-window joins at the next pass, not
after their remaining passes (a whole window of a full batch is seconds on
CPU), and a request leaves after its last window's last pass. Every window is
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
    codebook: int = 0  # the codebook the next pass fills (set at admission to the first one)
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
        self.jobs.append(_FineJob(req, plan, seq, stage_generator(req.seed, self.name),
                                  codebook=spec.n_coarse_codebooks))

    def cancel(self, request_id: str) -> bool:
        n = len(self.jobs)
        self.jobs = [j for j in self.jobs if j.request.request_id != request_id]
        return len(self.jobs) != n

    @torch.inference_mode()
    def step(self) -> list[EngineResult]:
        """One codebook pass for every held request (each at its own pass of its own window)."""
        if not self.jobs:
            return []
        t0 = time.perf_counter()
        spec, win = self.spec, self.spec.max_fine_input_length
        jobs = self.jobs
        windows = [j.plan.windows[j.window] for j in jobs]
        batch = torch.stack([j.sequence[w.start: w.start + win] for j, w in zip(jobs, windows)])  # (B, 1024, 8)
        chunk = max(1, self.forward_token_budget(self.shape.hidden) // win)
        for lo in range(0, len(jobs), chunk):
            part = jobs[lo: lo + chunk]
            logits = self.model.forward_rows(batch[lo: lo + chunk], [j.codebook for j in part])
            for i, (job, w) in enumerate(zip(part, windows[lo: lo + chunk])):
                rows = logits[i, w.fill_from:, : spec.codebook_size].float()  # (N, V)
                uniform = draw_uniform([job.generator], [rows.shape[0]], self.device)
                job.sequence[w.start + w.fill_from: w.start + win, job.codebook] = sample_rows(
                    rows, [job.request.sampling] * rows.shape[0], uniform)
        results = [res for job in jobs if (res := self._advance(job)) is not None]
        self.jobs = [j for j in jobs if j.window < len(j.plan.windows)]
        frames = float(sum(win - w.fill_from for w in windows))
        self._record({"batch": float(len(jobs)), "tokens": frames, "step_s": time.perf_counter() - t0,
                      "window_flops": fine_flops(self.shape, len(jobs), win, 1)})
        return results

    def _advance(self, job: _FineJob) -> EngineResult | None:
        """After a pass: the next codebook, else the next window, else the request's result."""
        spec = self.spec
        job.codebook += 1
        if job.codebook < spec.n_fine_codebooks:
            return None
        job.codebook, job.window = spec.n_coarse_codebooks, job.window + 1
        if job.window < len(job.plan.windows):
            return None
        out = T.fine_output(job.plan, job.sequence.cpu().numpy()).astype(np.int32)  # (8, T)
        return EngineResult(job.request.request_id, output=out,
                            timings={"latency_s": time.perf_counter() - job.started})
