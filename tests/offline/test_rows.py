"""Row checks and the stage loop without Ray: bad rows fail alone with a reason; the four stage loops
over a batch of rows give the in-process pipeline's audio."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from bark_serve.offline.rows import WORK_SCHEMA, Status, raw_from_table
from bark_serve.offline.stage_run import run_stage
from bark_serve.offline.udfs import RowPlanner
from bark_serve.serving.config import parse_config
from bark_serve.stages.constants import STAGES
from tests.offline.conftest import GOOD_ROWS, QUANT, SCRIPT_ROW, assert_same_audio, offline_config, reference


@pytest.fixture(scope="module")
def config(tiny_ckpt) -> dict:
    return parse_config(offline_config(str(tiny_ckpt))).model_dump(mode="json")


def jsonl_batch(lines: list[str]) -> pa.Table:
    return pa.table({"text": lines})


def test_bad_rows_fail_alone_with_their_reason(config):
    lines = [json.dumps(r) for r in GOOD_ROWS] + [
        json.dumps({"id": "empty", "text": "  "}),
        json.dumps({"id": "voice", "text": "hi", "voice": "no-such-voice"}),
        json.dumps({"id": "opts", "text": "hi", "options": {"temprature": 1}}),
        json.dumps({"id": "range", "text": "hi", "options": {"top_p": 2}}),
        json.dumps({"id": "fmt", "text": "hi", "format": "midi"}),
        json.dumps({"id": "seed", "text": "hi", "seed": "seven"}),
        json.dumps({"id": "extra", "text": "hi", "speaker": 3}),
        json.dumps({"id": "long", "text": "x" * 5000}),  # beyond max_text_chars (a good row's id, see below)
        json.dumps({"id": "../escape", "text": "hi"}),
        json.dumps({"text": "no id"}),
        "{not json",
        "[1, 2]",
        "   ",  # blank lines are skipped
    ]
    cfg = dict(config, orchestrator={**config["orchestrator"], "max_text_chars": 4000})
    out = RowPlanner(cfg, "jsonl", "wav")(jsonl_batch(lines))
    assert out.schema == WORK_SCHEMA
    rows = out.to_pylist()
    assert len(rows) == len(lines) - 1
    for good, row in zip(GOOD_ROWS, rows):
        assert (row["id"], row["status"]) == (str(good["id"]), Status.PENDING.value), row["error"]
    failed = {r["id"]: r["error"] for r in rows if r["status"] == Status.FAILED.value}
    assert failed["empty"] == "text is empty"
    assert "unknown voice 'no-such-voice'" in failed["voice"]
    assert "temprature" in failed["opts"] and "top_p" in failed["range"]
    assert "format" in failed["fmt"] and "seed" in failed["seed"] and "speaker" in failed["extra"]
    invalid = [e for rid, e in failed.items() if rid.startswith("invalid-")]
    assert len(invalid) == 4  # bad id, missing id, not JSON, not an object: a stable made-up id each
    assert any("id" in e and "must match" in e for e in invalid)
    assert any("not valid JSON" in e for e in invalid) and any("expected an object" in e for e in invalid)
    # the row with the same id as a good one, but too long, is recorded as failed too
    assert [r["status"] for r in rows if r["id"] == "long"] == ["pending", "failed"]
    # ids made up for bad rows are stable: a rerun records the same ids
    again = RowPlanner(cfg, "jsonl", "wav")(jsonl_batch(lines)).to_pylist()
    assert [r["id"] for r in again] == [r["id"] for r in rows]


def test_a_lone_surrogate_or_a_huge_text_fails_its_row_and_the_batch_still_builds(config):
    """Unchecked text goes into the manifest short and printable: Arrow refuses lone surrogates."""
    lines = [json.dumps({"id": "sur", "text": "a\ud800b"}), json.dumps({"id": "big", "text": "y" * 50_000}),
             json.dumps({"id": "vsur", "text": "hi", "voice": "\udfff"}), json.dumps(GOOD_ROWS[1])]
    out = {r["id"]: r for r in RowPlanner(config, "jsonl", "wav")(jsonl_batch(lines)).to_pylist()}
    assert out["sur"]["status"] == "failed" and out["sur"]["text"] == "a\\ud800b" and "surrogate" in out["sur"]["error"]
    assert out["vsur"]["status"] == "failed" and out["vsur"]["voice"] == "\\udfff"
    assert out["big"]["status"] == "failed" and len(out["big"]["text"]) <= 501
    assert out["short"]["status"] == "pending" and out["short"]["text"] == GOOD_ROWS[1]["text"]
    long_ok = {"id": "long-ok", "text": "word " * 300}  # longer than an error's clip, within max_text_chars
    assert RowPlanner(config, "jsonl", "wav")(jsonl_batch([json.dumps(long_ok)])).to_pylist()[0]["text"] == \
        long_ok["text"]


def test_resume_drops_done_ids_before_planning_them(config):
    lines = [json.dumps(r) for r in GOOD_ROWS]
    planner = RowPlanner(config, "jsonl", "wav", frozenset({"long", "42"}))
    planned, plan = [], planner.planner.plan
    planner.planner.plan = lambda text, voice, params, priority, request_id, script, own_voices=None: (
        planned.append(request_id) or plan(text, voice, params, priority, request_id, script))
    out = planner(jsonl_batch(lines)).to_pylist()
    assert [r["id"] for r in out] == ["short", "sampled", "raw"] == planned  # done rows are not tokenized again


def test_csv_cells_and_json_options(config, tmp_path):
    from bark_serve.offline.run import csv_convert_options

    path = tmp_path / "in.csv"
    path.write_text('id,text,voice,seed,options\n'
                    '001,Hello there.,,5,"{""temperature"": 0}"\n'
                    'b,Second row.,v2/en_speaker_6,,\n'
                    'c,Bad options.,,,{oops\n'
                    '1,12345,,,\n')  # id 1 is not id 001; a numeric text is text
    rows = RowPlanner(config, "table", "flac")(pacsv.read_csv(path, convert_options=csv_convert_options())).to_pylist()
    assert [(r["id"], r["status"]) for r in rows] == [("001", "pending"), ("b", "pending"), ("c", "failed"),
                                                      ("1", "pending")]
    assert rows[3]["text"] == "12345"
    assert rows[0]["seed"] == 5 and rows[0]["options"] == '{"temperature": 0}' and rows[0]["format"] == "flac"
    assert rows[1]["voice"] == "v2/en_speaker_6" and rows[1]["seed"] is not None  # a seed is drawn and recorded
    assert "options" in rows[2]["error"]


def test_parquet_struct_options_drop_nulls():
    # Arrow unifies struct fields across rows: a field one row lacks is null there, which means "absent".
    assert raw_from_table({"id": "a", "text": "t", "options": {"temperature": None, "max_semantic_tokens": 8},
                           "voice": None}) == {"id": "a", "text": "t", "options": {"max_semantic_tokens": 8}}
    assert raw_from_table({"id": "a", "text": "t", "options": [("top_k", 5), ("top_p", None)]})["options"] == \
        {"top_k": 5}


def test_stage_loops_give_the_pipeline_audio(config, pipe, tiny_ckpt, tmp_path):
    """Rows of one, two and three segments batch together in each stage (capacity 2 < rows), in order
    within a row; the audio equals BarkPipeline.synthesize for greedy and seeded rows. Every step runs on
    a core leased from a one-core budget (``torch_threads: shared``) and the stage is idle after its rows."""
    import torch

    from bark_serve.cluster.cores import CoreBudget
    from bark_serve.offline.rows import row_post_process
    from bark_serve.serving.config import AudioConfig
    from bark_serve.serving.stage_server import engine_options, load_engine
    from bark_serve.stages.audio import join_segments

    cfg = parse_config(config)
    rows = RowPlanner(config, "jsonl", "wav")(jsonl_batch([json.dumps(r) for r in GOOD_ROWS])).to_pylist()
    assert rows[0]["segments"] >= 2
    for stage in STAGES:
        if stage == "codec":  # the codec reads only the fine stage's output
            rows = [{**r, "semantic": None, "coarse": None} for r in rows]
        engine = load_engine(stage, cfg, engine_options(cfg.stage(stage)))
        cores = CoreBudget(cores=1, folder=tmp_path / "cores", on_grant=torch.set_num_threads)
        busy = run_stage(engine, stage, rows, cores)
        assert busy > 0 and engine.num_active == 0
        assert cores.leases == engine.totals["steps"] and cores.busy_replicas() == 0
        cores.close()
    for good, row in zip(GOOD_ROWS, rows):
        assert row["status"] == Status.PENDING.value, row["error"]
        joined = join_segments(row["audio"], 24000, row_post_process(row["options"], AudioConfig()))  # as _write does
        assert_same_audio(joined, reference(pipe, {**good, "seed": row["seed"]}))
    assert 0 < rows[0]["semantic_tokens"] <= 10 * rows[0]["segments"]


def _run_stages(cfg, rows: list[dict]) -> dict[str, object]:
    """The four stage loops over ``rows`` (in place), as the stage workers run them; -> the engines."""
    from bark_serve.serving.stage_server import engine_options, load_engine

    engines = {}
    for stage in STAGES:
        engines[stage] = engine = load_engine(stage, cfg, engine_options(cfg.stage(stage)))
        assert run_stage(engine, stage, rows) > 0 and engine.num_active == 0
    return engines


def test_a_script_row_gives_the_served_apps_audio(config):
    """A multi-speaker script row (batched with a text row) is planned by the one planner and its stages follow
    the one history rule: its audio equals the served synthesizer's for the same greedy request."""
    import asyncio

    from bark_serve.offline.rows import row_params, row_post_process
    from bark_serve.serving.config import AudioConfig
    from bark_serve.serving.scheduler import StageScheduler
    from bark_serve.serving.stage_calls import make_planner
    from bark_serve.serving.synthesis import Synthesizer
    from bark_serve.stages.audio import join_segments
    from bark_serve.stages.types import Priority

    cfg = parse_config(config)
    rows = RowPlanner(config, "jsonl", "wav")(jsonl_batch([json.dumps(SCRIPT_ROW), json.dumps(GOOD_ROWS[1])]))
    rows = rows.to_pylist()
    assert rows[0]["status"] == Status.PENDING.value, rows[0]["error"]
    assert rows[0]["segments"] == 4 and rows[0]["speakers"] == [0, 0, 1, 0]
    engines = _run_stages(cfg, rows)
    assert rows[0]["status"] == Status.PENDING.value, rows[0]["error"]
    post = row_post_process(rows[0]["options"], AudioConfig())
    dataset = join_segments(rows[0]["audio"], 24000, post)

    async def served():
        scheds = {s: StageScheduler(engines[s], batch_wait_s=0) for s in STAGES}

        async def call(stage, req, priority):
            return await scheds[stage].submit(req, priority)

        synth = Synthesizer(make_planner(cfg), engines["codec"].spec, call)
        lines = [(line["voice"], line["text"]) for line in SCRIPT_ROW["script"]]
        params = row_params(rows[0]["options"], rows[0]["seed"])
        plan = await synth.plan_async(None, None, params, Priority.BATCH, "s", lines)
        assert plan.speakers == tuple(rows[0]["speakers"])
        return [c.audio for c in await synth.collect(plan)]

    segments = asyncio.run(served())
    assert [len(a) for a in segments] == [len(a) for a in rows[0]["audio"]]
    np.testing.assert_allclose(dataset, join_segments(segments, 24000, post), atol=1e-5)


def test_the_history_walk_over_thousands_of_near_silent_segments_does_not_recurse():
    """A row whose segments are all too short to carry the voice: every one's history is the row's voice."""
    from bark_serve.offline.stage_run import RowWork
    from bark_serve.stages.plan import Plan
    from bark_serve.stages.types import GenerationParams, VoicePrompt

    n = 3000
    voice = VoicePrompt(np.zeros(4, np.int64), np.zeros((2, 4), np.int64), np.zeros((8, 4), np.int64))
    plan = Plan("r", (), (np.zeros(1, np.int64),) * n, (voice,), (0,) * n, GenerationParams(), 0)
    short = [np.zeros(1, np.int64)] * n  # one semantic token: carries no voice
    assert RowWork(0, plan, short, {"semantic": short}, [None] * n).history("coarse", n - 1) is voice
    long = [np.arange(8)] + short[1:]  # segment 0 carries it: the walk stops there
    coarse = [np.ones((2, 3), np.int64)] + [None] * (n - 1)  # what the coarse stage has made so far
    got = RowWork(0, plan, long, {"semantic": long}, coarse).history("coarse", n - 1)
    assert np.array_equal(got.semantic, np.arange(8)) and np.array_equal(got.coarse, coarse[0])


def test_a_row_whose_audio_cannot_be_encoded_fails_alone(tmp_path):
    """The codec worker's join and encode errors are the row's failure, not an exception out of the batch."""
    from bark_serve.offline.outdir import OutDir
    from bark_serve.offline.rows import empty_row
    from bark_serve.offline.udfs import CodecWorker
    from bark_serve.serving.config import AudioConfig

    worker = object.__new__(CodecWorker)  # the engine is beside the point here
    worker.sample_rate, worker.audio_config, worker.out = 24_000, AudioConfig(), OutDir(str(tmp_path))
    worker.out.makedirs()
    segments = [np.sin(np.arange(4800, dtype=np.float32) / 9) * 0.3]
    rows = [{**empty_row(rid), "status": Status.PENDING.value, "format": fmt, "audio": list(segments)}
            for rid, fmt in (("good", "wav"), ("bad", "midi"))]
    for row in rows:
        worker._write(row)
    good, bad = rows
    assert good["status"] == Status.OK.value, good["error"]
    assert (tmp_path / good["path"]).is_file()
    assert bad["status"] == Status.FAILED.value and "encoding the audio failed" in bad["error"] and not bad["path"]


def test_stage_pools_from_the_config_blocks(tiny_ckpt):
    """Each stage block gives its map_batches: pool resource, CPUs/GPUs, pool size, batch size; and Ray Data
    restarts a dead actor and retries its tasks without being asked."""
    from ray.data._internal.execution.operators import actor_pool_map_operator as apm

    from bark_serve.offline.settings import plan_spec, stage_specs

    raw = offline_config(str(tiny_ckpt))
    raw["fine"] = {**raw["fine"], "pool": "gpu", "num_gpus": 0.5, "max_batch": 3,
                   "autoscaling": {"min_replicas": 0, "max_replicas": 4}}
    raw["codec"] = {**raw["codec"], "pool": None, "num_replicas": 2}
    specs = stage_specs(parse_config(raw))
    fine = specs["fine"].kwargs()
    assert fine["resources"] == {"bark_pool_gpu": 1.0} and fine["num_gpus"] == 0.5 and fine["batch_size"] == 3
    assert (fine["compute"].min_size, fine["compute"].max_size) == (1, 4)  # at least one actor
    codec = specs["codec"].kwargs()
    assert "resources" not in codec and "num_gpus" not in codec
    assert (codec["compute"].min_size, codec["compute"].max_size) == (2, 2)
    assert specs["semantic"].kwargs()["resources"] == {"bark_pool_semantic": 1.0}
    assert plan_spec(parse_config(raw)).kwargs()["num_cpus"] == 0.25
    source = open(apm.__file__).read()
    assert 'ray_remote_args["max_restarts"] = -1' in source and 'ray_remote_args["max_task_retries"] = -1' in source


def test_a_row_may_name_a_voice_registered_without_keys(config, tmp_path):
    """Issue 23: a voice registered on a server without API keys (the one shared owner, kept in the voice
    folder) is a dataset row's voice by its name or id, in a text row and in a script; another name stays
    an unknown voice."""
    import asyncio

    from bark_serve.cluster.voice_backends import DirVoiceStore
    from bark_serve.offline.rows import unpack_voices
    from bark_serve.stages.voices import VoiceLibrary, voice_npz_bytes
    from bark_serve.stages.weights import Checkpoint

    ckpt = Checkpoint.open(config["model"])
    voice = VoiceLibrary(ckpt.spec, ckpt).resolve("announcer")
    store = DirVoiceStore(tmp_path / "voices")
    made = asyncio.run(store.add("", "house voice", voice_npz_bytes(voice), 2.0))
    asyncio.run(store.add("someone-else", "private", voice_npz_bytes(voice), 2.0))
    cfg = dict(config, voice_cloning={**config["voice_cloning"], "store_dir": str(tmp_path / "voices")})
    lines = [json.dumps({"id": "by-name", "text": "Hi.", "voice": "house voice"}),
             json.dumps({"id": "by-id", "text": "Hi.", "voice": made.id}),
             json.dumps({"id": "script", "script": [{"voice": "house voice", "text": "One."},
                                                    {"voice": "alloy", "text": "Two."}]}),
             json.dumps({"id": "private", "text": "Hi.", "voice": "private"})]
    rows = {r["id"]: r for r in RowPlanner(cfg, "jsonl", "wav")(jsonl_batch(lines)).to_pylist()}
    for rid in ("by-name", "by-id", "script"):
        assert rows[rid]["status"] == Status.PENDING.value, rows[rid]["error"]
        planned = unpack_voices(rows[rid]["voices"])[0]
        assert planned is not None
        np.testing.assert_array_equal(planned.semantic, voice.semantic)
        np.testing.assert_array_equal(planned.fine, voice.fine)
    assert rows["private"]["status"] == Status.FAILED.value and "unknown voice" in rows["private"]["error"]


def test_same_audio_allows_rounding_but_not_other_audio():
    """The parity check's fallback: a rounding-level error passes, other audio of the same length does not."""
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, 24_000)
    assert_same_audio(audio + QUANT / 4, audio)  # within quantization
    assert_same_audio(audio * 1.01 + 1e-3, audio)  # about 40 dB below the signal
    with pytest.raises(AssertionError, match="SNR"):
        assert_same_audio(rng.uniform(-0.5, 0.5, 24_000), audio)  # another row's audio
    with pytest.raises(AssertionError, match="SNR"):
        assert_same_audio(np.concatenate([audio[:12_000], rng.uniform(-0.5, 0.5, 12_000)]), audio)  # half wrong
    with pytest.raises(AssertionError):
        assert_same_audio(audio[:-1], audio)  # a sample short


def test_the_row_with_the_longest_chain_goes_first(config):
    """Two places; two one-segment rows given before a three-segment row. Its segments run one after the
    other, so it is the critical path: admitted first, the short rows run beside it and each stage takes
    as many steps as that chain (in the given order it would start only after a short row ended)."""
    from bark_serve.stages.tokens import coarse_output_length

    greedy = {"temperature": 0, "max_semantic_tokens": 10}
    lines = [json.dumps({"id": "a", "text": "Hello there.", "options": {**greedy, "max_semantic_tokens": 4}}),
             json.dumps({"id": "b", "text": "Hi.", "options": {**greedy, "max_semantic_tokens": 5}}),
             json.dumps({"id": "c", "text": GOOD_ROWS[0]["text"], "options": greedy})]
    cfg = parse_config(config)
    rows = RowPlanner(config, "jsonl", "wav")(jsonl_batch(lines)).to_pylist()
    assert [r["segments"] for r in rows] == [1, 1, 3] and cfg.stage("semantic").max_batch == 2
    engines = _run_stages(cfg, rows)
    assert all(r["status"] == Status.PENDING.value for r in rows), [r["error"] for r in rows]
    from bark_serve.offline.rows import unpack_arrays

    sem = {r["id"]: [len(s) for s in unpack_arrays(r["semantic"])] for r in rows}
    spec = engines["coarse"].spec
    coarse = {k: [coarse_output_length(n, spec) for n in v] for k, v in sem.items()}
    assert sum(sem["a"] + sem["b"]) < sum(sem["c"]) and sum(coarse["a"] + coarse["b"]) < sum(coarse["c"])
    assert engines["semantic"].totals["steps"] == sum(sem["c"])
    assert engines["coarse"].totals["steps"] == sum(coarse["c"])
