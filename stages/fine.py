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

With ``cuda_graphs`` on, a pass is a fixed-shape step (stages/graphs.py): the held windows are
copied into a static (bucket, 1024, 8) buffer, every row takes its own head from one stacked
weight (``FineLM.forward_static``) and samples on the device, and the captured graph of that
bucket is replayed. Each request's uniforms are drawn once at admission, so its tokens do not
depend on the batch, the bucket or the path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import tokens as T
from .constants import BarkSpec
from .engine import EngineOptions, StageEngine, check_int_array, load_for, single_shape_for
from .flops import Shape, fine_flops
from .graphs import StepGraphs, buckets_for, fit, use_graphs
from .modeling import FineLM, ModelConfig
from .sampling import RowSampling, SampleMode, predraw, sample_tokens, stage_generator
from .types import GREEDY, EngineResult, FineRequest
from .weights import Checkpoint


@dataclass
class _FineJob:
    request: FineRequest
    plan: T.FinePlan
    sequence: torch.Tensor  # (L, 8) on the engine's device
    sampling: RowSampling  # (1024,): the request's parameters for a window's rows
    draws: torch.Tensor | None  # every uniform the request samples with, in order (None: greedy)
    drawn: int = 0
    window: int = 0
    codebook: int = 0  # the codebook the next pass fills (set at admission to the first one)
    started: float = field(default_factory=time.perf_counter)

    def next_draws(self, n: int) -> torch.Tensor | None:
        """The next ``n`` of the request's uniforms (None for a greedy request)."""
        if self.draws is None:
            return None
        out = self.draws[self.drawn: self.drawn + n]
        self.drawn += n
        return out


class FineEngine(StageEngine[FineRequest]):
    name = "fine"

    def __init__(self, options: EngineOptions, model: FineLM, spec: BarkSpec):
        super().__init__(options)
        self.model, self.spec = model, spec
        fixed = use_graphs(options.cuda_graphs, self.device, options.cpu_offload)
        self.single_shape = single_shape_for(options, self.device, fixed)  # every pass at capacity windows
        if not self.single_shape:  # a pass holds 1024 rows per request: only the attention changes (invariance.py)
            self.row_floor = self._batch_invariant(model, options.capacity)
        self.shape = Shape.of(model)
        self.jobs: list[_FineJob] = []
        self.graphs: StepGraphs | None = None
        if fixed:
            self._fixed_buffers(options.capacity)
            self.row_buckets = (options.capacity,) if self.single_shape else \
                buckets_for(options.capacity, options.graph_buckets)
            self.graphs = StepGraphs.grid(self._pass_fixed, [self.row_buckets], self.device, "fine pass")
            with torch.inference_mode():
                self.graphs.capture()

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

    def graph_stats(self) -> dict | None:
        """Captured graphs, capture seconds and graph memory (None when passes run eagerly)."""
        if self.graphs is None:
            return None
        return {**self.graphs.stats(), "row_buckets": list(self.row_buckets), "single_shape": self.single_shape}

    def expected_steps(self, request: FineRequest) -> int:
        return int(request.coarse_codes.shape[-1])  # frames: its windows, and so its passes, grow with them

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
        win = spec.max_fine_input_length
        draws = None
        if SampleMode.of(req.sampling) != SampleMode.GREEDY:  # every pass of every window, in order
            passes = spec.n_fine_codebooks - spec.n_coarse_codebooks
            n = passes * sum(win - w.fill_from for w in plan.windows)
            draws = predraw(stage_generator(req.seed, self.name), n).to(self.device)
        self.jobs.append(_FineJob(req, plan, seq, RowSampling.repeat(req.sampling, win, self.device), draws,
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
        win = self.spec.max_fine_input_length
        jobs = self.jobs
        windows = [j.plan.windows[j.window] for j in jobs]
        mode = max(SampleMode.of(j.request.sampling) for j in jobs)
        run = self._pass_graph if self.graphs is not None else self._pass_eager
        replayed = run(jobs, windows, mode)
        results = [res for job in jobs if (res := self._advance(job)) is not None]
        self.jobs = [j for j in jobs if j.window < len(j.plan.windows)]
        frames = float(sum(win - w.fill_from for w in windows))
        self._device_sync()  # the pass's tokens are written back on the device: nothing above waited for it
        step_s = time.perf_counter() - t0
        self._record({"batch": float(len(jobs)), "tokens": frames, "step_s": step_s, "decode_only_steps": 1.0,
                      "decode_only_s": step_s, "graph_steps": float(replayed), "bucket": float(self._bucket(len(jobs))),
                      "window_flops": fine_flops(self.shape, len(jobs), win, 1)})
        return results

    def _bucket(self, n: int) -> int:
        """The rows a pass of ``n`` requests computes (its bucket on the fixed-shape path)."""
        return (fit(self.row_buckets, n) or n) if self.graphs is not None else n

    def _pass_eager(self, jobs: list[_FineJob], windows: list[T.FineWindow], mode: SampleMode) -> bool:
        spec, win = self.spec, self.spec.max_fine_input_length
        batch = torch.stack([j.sequence[w.start: w.start + win] for j, w in zip(jobs, windows)])  # (B, 1024, 8)
        chunk = max(1, self.forward_token_budget(self.shape.hidden) // win)
        for lo in range(0, len(jobs), chunk):
            part = jobs[lo: lo + chunk]
            logits = self.model.forward_rows(batch[lo: lo + chunk], [j.codebook for j in part])
            for i, (job, w) in enumerate(zip(part, windows[lo: lo + chunk])):
                rows = logits[i, w.fill_from:, : spec.codebook_size]  # (N, V)
                n = rows.shape[0]
                uniform = job.next_draws(n)
                if uniform is None:
                    uniform = torch.zeros((n,), dtype=torch.float64, device=self.device)
                job.sequence[w.start + w.fill_from: w.start + win, job.codebook] = sample_tokens(
                    rows, job.sampling.head(n), uniform, mode)
        return False

    def _fixed_buffers(self, capacity: int) -> None:
        spec, win = self.spec, self.spec.max_fine_input_length
        self._codes = torch.zeros((capacity, win, spec.n_fine_codebooks), dtype=torch.long, device=self.device)
        self._codebook = torch.full((capacity,), spec.n_coarse_codebooks, dtype=torch.long, device=self.device)
        self._uniform = torch.zeros((capacity, win), dtype=torch.float64, device=self.device)
        self._params = RowSampling.repeat(GREEDY, capacity, self.device)  # one row per held request
        self._heads = self.model.stacked_heads()  # (heads, V, C)

    def _pass_fixed(self, shape: tuple[int, ...], mode: SampleMode) -> torch.Tensor:
        """The fixed-shape pass a graph captures: rows 0..b-1 of the static buffers. -> tokens (b, 1024)"""
        (b,), v = shape, self.spec.codebook_size
        logits = self.model.forward_static(self._codes[:b], self._codebook[:b], self._heads)[:, :, :v]  # (b, T, V)
        t = logits.shape[1]
        rows = self._params.head(b).expand(t)  # (b * T,)
        return sample_tokens(logits.reshape(b * t, v), rows, self._uniform[:b].reshape(-1), mode).view(b, t)

    def _pass_graph(self, jobs: list[_FineJob], windows: list[T.FineWindow], mode: SampleMode) -> bool:
        """Copy the held windows into the static buffers, run the bucket's pass, write the tokens back."""
        assert self.graphs is not None, "only the fixed-shape path copies into the static buffers"
        win, b = self.spec.max_fine_input_length, len(jobs)
        for i, (job, w) in enumerate(zip(jobs, windows)):
            self._codes[i].copy_(job.sequence[w.start: w.start + win])
            uniform = job.next_draws(win - w.fill_from)
            if uniform is not None:
                self._uniform[i, w.fill_from:].copy_(uniform)
        self._codebook[:b].copy_(torch.tensor([j.codebook for j in jobs]))
        self._params.assign(b, [j.sampling for j in jobs])
        out, replayed = self.graphs.run((self._bucket(b),), mode)
        for i, (job, w) in enumerate(zip(jobs, windows)):
            job.sequence[w.start + w.fill_from: w.start + win, job.codebook] = out[i, w.fill_from:]
        return replayed

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
