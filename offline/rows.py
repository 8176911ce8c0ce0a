"""Rows of a dataset run: the columns that travel between stages, and the check of one input row.

An input row is validated exactly as a batch item is (``cluster/batch_types.parse_item``: id, text,
voice, seed, format, options), its options as the HTTP API's (``BarkOptions``, unknown keys refused),
and it is planned as every request is (``stages/plan.Planner``: text or a multi-speaker script, split,
tokenized, voices resolved). A bad row becomes a row with status ``failed`` and the reason; it never stops the run.

Between stages a row carries its per-segment token arrays as binary columns (``pack_arrays``:
an .npz of the arrays, no pickle), so each stage reads the outputs of the stages before it.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from bark_serve.cluster.batch_types import InvalidBatchError, item_id_of, parse_item
from bark_serve.schema.formats import check_format
from bark_serve.schema.options import SynthesisOptions
from bark_serve.schema.untrusted import clip, invalid_request
from bark_serve.serving.config import AudioConfig
from bark_serve.stages.audio import PostProcess
from bark_serve.stages.constants import STAGES
from bark_serve.stages.plan import Plan, Planner
from bark_serve.stages.types import GenerationParams, InvalidRequestError, Priority, VoicePrompt

MAX_ERROR_CHARS = 500
TABLE_FIELDS = ("id", "text", "voice", "seed", "format", "options")


class Status(str, enum.Enum):
    PENDING = "pending"  # planned, still in the stages
    OK = "ok"
    FAILED = "failed"


# What travels from stage to stage. The manifest is a subset (manifest.MANIFEST_SCHEMA).
WORK_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("voice", pa.string()), ("seed", pa.int64()),
    ("options", pa.string()), ("format", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("segments", pa.int64()), ("semantic_tokens", pa.int64()), ("path", pa.string()), ("duration_s", pa.float64()),
    ("voices", pa.binary()), ("speakers", pa.list_(pa.int64())), ("text_ids", pa.binary()),
    *[(stage, pa.binary()) for stage in STAGES[:-1]],
    *[(f"busy_s_{stage}", pa.float64()) for stage in STAGES],
    *[(f"node_{stage}", pa.string()) for stage in STAGES],
])


def pack_arrays(arrays: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(a) for a in arrays])
    return buf.getvalue()


def unpack_arrays(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


def pack_voices(voices: Sequence[VoicePrompt | None]) -> bytes:
    """A plan's voices (one per speaker, None: no voice) as one .npz: three arrays per voice, keyed by speaker."""
    buf = io.BytesIO()
    arrays = {f"{k}_{part}": np.asarray(getattr(v, part)) for k, v in enumerate(voices) if v is not None
              for part in ("semantic", "coarse", "fine")}
    np.savez(buf, n=np.int64(len(voices)), **arrays)  # type: ignore[arg-type]  # mypy matches **arrays to allow_pickle
    return buf.getvalue()


def unpack_voices(data: bytes) -> tuple[VoicePrompt | None, ...]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return tuple(VoicePrompt(npz[f"{k}_semantic"], npz[f"{k}_coarse"], npz[f"{k}_fine"])
                     if f"{k}_semantic" in npz.files else None for k in range(int(npz["n"])))


def row_plan(row: dict) -> Plan:
    """A pending row's plan, as ``plan_row`` stored it (the text itself is not needed any more)."""
    seed = int(row["seed"])
    return Plan(row["id"], (), tuple(unpack_arrays(row["text_ids"])), unpack_voices(row["voices"]),
                tuple(row["speakers"]), row_params(row["options"], seed), seed, Priority.BATCH)


def row_params(options_json: str | None, seed: int | None) -> GenerationParams:
    """A row's generation parameters; raises InvalidRequestError for bad options."""
    try:
        options = json.loads(options_json) if options_json else {}
        if not isinstance(options, dict):
            raise InvalidRequestError("options must be an object")
        return SynthesisOptions.model_validate({**options, **({"seed": seed} if seed is not None else {})}) \
            .generation_params()
    except ValidationError as exc:
        raise invalid_request(exc) from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"options are not valid JSON: {exc}") from None


def row_post_process(options_json: str | None, defaults: AudioConfig) -> PostProcess:
    """How a row's segments are joined: the config's ``audio:`` block with the row's own options."""
    options = json.loads(options_json) if options_json else {}
    return SynthesisOptions.model_validate(options).post_process(defaults)


def empty_row(row_id: str) -> dict:
    return {name: None for name in WORK_SCHEMA.names} | {"id": row_id}


def failed_row(row: dict, error: str) -> dict:
    return {**row, "status": Status.FAILED.value, "error": clip(str(error), MAX_ERROR_CHARS)}


def raw_from_line(line: str) -> tuple[Any, str | None]:
    """A JSONL line -> (raw item, parse error)."""
    try:
        return json.loads(line), None
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"not valid JSON: {exc}"


def raw_from_table(record: dict) -> dict:
    """A CSV/Parquet record as a batch item: a null (or, in CSV, empty) cell is an absent field, and
    ``options`` may be a JSON string (CSV) or a struct/map (Parquet) whose nulls are absent keys."""
    out = {k: v for k, v in record.items() if v is not None and v != ""}
    options = out.get("options")
    if isinstance(options, str):
        try:
            out["options"] = json.loads(options)
        except json.JSONDecodeError:
            pass  # parse_item reports that options must be an object
    elif isinstance(options, list):  # an Arrow map column comes back as (key, value) pairs
        out["options"] = {k: v for k, v in options if v is not None}
    elif isinstance(options, dict):
        out["options"] = {k: v for k, v in options.items() if v is not None}
    return out


def fallback_id(raw: Any, line: str | None) -> str:
    """An id for a row whose own id is unusable: stable across runs (a hash of the row)."""
    blob = line if line is not None else json.dumps(raw, sort_keys=True, default=str)
    return "invalid-" + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _printable(value: Any) -> str | None:
    """A string field of a row not yet validated, as the manifest may record it: clipped, surrogates escaped."""
    if not isinstance(value, str):
        return None
    return clip(value, MAX_ERROR_CHARS).encode("utf-8", "backslashreplace").decode("utf-8")


def declared_ids(batch: pa.Table, source: str) -> pa.Table:
    """The valid ids the rows of an input batch declare (JSONL lines or table records; blank lines and
    rows without a usable id give none): the duplicate check's ``map_batches``. -> a table of one column ``id``"""
    if source == "jsonl":
        raws = [raw_from_line(line)[0] for line in batch.column("text").to_pylist() if line.strip()]
    else:
        raws = [raw_from_table(record) for record in batch.to_pylist()]
    return pa.table({"id": pa.array([i for i in map(declared_id, raws) if i is not None], pa.string())})


def declared_id(raw: Any) -> str | None:
    """The id a raw row declares, if it is a valid one (for skipping rows already done before planning them)."""
    try:
        return item_id_of(raw, 0) if isinstance(raw, dict) and raw.get("id") is not None else None
    except InvalidBatchError:
        return None


def plan_row(raw: Any, parse_error: str | None, planner: Planner, default_format: str, line: str | None = None,
             own_voices: Callable[[set[str]], Mapping[str, VoicePrompt]] | None = None) -> dict:
    """Validate and plan one input row; the result has status pending (ready for semantic) or failed.
    ``own_voices(names)``: the registered voices among the voice names the row gives (serving/voices_api.py)."""
    if isinstance(raw, dict) and raw.get("id") is None:  # a batch item may go without (its index); a row may not
        return failed_row(empty_row(fallback_id(raw, line)), "id is missing: every row needs a unique id")
    try:
        row_id = item_id_of(raw, 0) if isinstance(raw, dict) else fallback_id(raw, line)
    except InvalidBatchError as exc:
        return failed_row(empty_row(fallback_id(raw, line)), str(exc).removeprefix("item 0: "))
    row = empty_row(row_id)
    if isinstance(raw, dict):  # unchecked yet: kept short and printable (a lone surrogate cannot go into Arrow)
        row.update(text=_printable(raw.get("text")), voice=_printable(raw.get("voice")))
    rec = parse_item(raw, 0, planner.max_text_chars or sys.maxsize, parse_error)
    if rec.error is not None:
        return failed_row(row, rec.error.removeprefix("item 0: "))
    row.update(text=rec.text or row["text"], voice=rec.voice if isinstance(rec.voice, str) else row["voice"])
    options = json.dumps(rec.options, sort_keys=True) if rec.options else None
    row.update(options=options, seed=rec.seed)
    try:
        fmt = check_format(rec.format if "format" in raw else default_format)
        script = None if rec.script is None else [(ln["voice"], ln["text"]) for ln in rec.script]
        named = {v for v in ([rec.voice] if script is None else [v for v, _ in script]) if isinstance(v, str)}
        own = own_voices(named) if own_voices is not None and named else None
        plan = planner.plan(None if script else rec.text, rec.voice, row_params(options, rec.seed), Priority.BATCH,
                            row_id, script, own)
    except InvalidRequestError as exc:
        return failed_row(row, str(exc))
    return {**row, "format": fmt, "seed": plan.seed, "status": Status.PENDING.value, "segments": plan.n_segments,
            "voices": pack_voices(plan.voices), "speakers": list(plan.speakers),
            "text_ids": pack_arrays(list(plan.text_ids))}
