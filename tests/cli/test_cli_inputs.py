"""Every command given bad input by a hostile user (found by an audit of the CLI): one line on stderr and exit
code 2, before any work, never a stack trace. In process (bark_serve.cli.main.main), on the tiny checkpoint;
nothing here starts Ray or talks to a server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bark_serve.cli.main import main


def run(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's one-line error (cli.main._Parser)
        code = exc.code
    return code, capsys.readouterr().err


def one_line(capsys, *argv, code: int = 2) -> str:
    got, err = run(capsys, *argv)
    assert got == code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["say", "hi", "-o", "{tmp}/a.wav", "--url", "localhost:8000"], "must start with http:// or https://"),
    (["say", "hi", "-o", "{tmp}/a.wav", "--url", "http://[::1"], "is not a URL"),
    (["say", "hi", "-o", "{tmp}/a.wav", "--url", "http://x:99999"], "is not a URL"),
    (["say", "hi", "-o", "{tmp}/a.wav", "--temperature", "nan"], "not a finite number"),
    (["say", "hi", "-o", "{tmp}/a.wav", "--temperature", "inf"], "not a finite number"),
    (["say", "hi", "-o", "{tmp}/a.wav", "--timeout", "-1"], "must be over 0"),
    (["say", "hi", "-o", "{tmp}/a.wav", "--timeout", "nan"], "not a finite number"),
    (["say", "a\udcff", "-o", "{tmp}/a.wav"], "not valid UTF-8"),  # argv bytes that are not UTF-8
    (["say", "hi", "-o", "{tmp}/no/such/dir/a.wav"], "no such directory"),
    (["batch", "submit", "{items}", "--out", "{tmp}/o", "--url", "localhost:8000"], "must start with http://"),
    (["batch", "submit", "{items}", "--out", "{tmp}/o", "--timeout", "nan"], "not a finite number"),
    (["batch", "status", "b_1", "--url", "http://[::1"], "is not a URL"),
    (["batch", "submit", "{items}", "--out", "{items}"], "is not a directory"),
    (["up", "--port", "0"], "must be at least 1"),
    (["up", "--port", "70000"], "must be at most 65535"),
    (["up", "--ready-timeout", "nan"], "not a finite number"),
    (["up", "--num-cpus", "0"], "must be at least 1"),
    (["dataset", "{items}", "--out", "{tmp}/d", "--manifest-flush-s", "nan"], "not a finite number"),
    (["dataset", "{items}", "--out", "{tmp}/d", "--num-cpus", "-2"], "must be at least 1"),
    (["make-checkpoint", "{tmp}/c", "--seed", "-1"], "must be at least 0"),
    (["make-checkpoint", "{tmp}/c", "--seed", "99999999999999999999999"], "must be at most"),
    (["voice", "clone", "{tmp}/a.wav", "-o", "{tmp}/v.npz", "--max-seconds", "nan"], "not a finite number"),
    (["voice", "clone", "{tmp}/a.wav", "-o", "{tmp}/v.npz", "--max-seconds", "0"], "must be over 0"),
])
def test_bad_arguments_are_refused_at_once(capsys, tmp_path, argv, message):
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "text": "hi"}\n')
    err = one_line(capsys, *[a.format(tmp=tmp_path, items=items) for a in argv])
    assert message in err
    assert not (tmp_path / "c").exists()  # make-checkpoint wrote nothing


def test_synth_refuses_what_it_cannot_do_before_loading_the_model(capsys, tmp_path):
    model = ["--model", tmp_path / "no-model-needed"]  # never opened: every case is refused before the load
    assert "not valid UTF-8" in one_line(capsys, "synth", "abc \udcff def", "-o", tmp_path / "a.wav", *model)
    assert "no such directory" in one_line(capsys, "synth", "hi", "-o", tmp_path / "x" / "a.wav", *model)
    (tmp_path / "d.wav").mkdir()
    assert "is a directory" in one_line(capsys, "synth", "hi", "-o", tmp_path / "d.wav", *model)
    assert "--save-voice" in one_line(capsys, "synth", "hi", "-o", tmp_path / "a.wav", "--save-voice",
                                      tmp_path / "x" / "v.npz", *model)


# The child of the test below: imports the CLI and runs the command once (the same path up to the check, so every
# import it needs is done), then, as root, becomes nobody (who could not read the interpreter's files under /root)
# and runs it for real.
AS_NOBODY = """
import contextlib, io, os, sys
from bark_serve.cli.main import main
out, model = sys.argv[1], sys.argv[2]
with contextlib.redirect_stderr(io.StringIO()):
    assert main(["synth", "hi", "-o", out + ".missing/a.wav", "--model", model]) == 2
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(main(["synth", "hi", "-o", out, "--model", model]))
"""


def test_synth_refuses_an_output_folder_this_user_cannot_write(tmp_path):
    """A folder the user may not write to. Root may write anywhere (CI runs as root), so the CLI runs in a process
    of its own that is ``nobody`` by then."""
    folder = Path(tempfile.mkdtemp(prefix="bark-locked-", dir="/tmp"))  # pytest's tmp_path is root-only (0700)
    try:
        folder.chmod(0o755)
        locked = folder / "locked"
        locked.mkdir(mode=0o555)
        res = subprocess.run([sys.executable, "-c", AS_NOBODY, str(locked / "a.wav"), str(tmp_path / "no-model")],
                             capture_output=True, text=True, timeout=120, cwd=folder)
        assert res.returncode == 2, res.stderr[-2000:]
        err = res.stderr
        assert err.count("\n") == 1 and "not writable" in err and "Traceback" not in err, err
        assert not (locked / "a.wav").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_disk_after_synthesis_is_one_line(capsys, tiny_ckpt, tmp_path):
    """/dev/full: the write fails after the work (ENOSPC); the message names the file, no stack trace."""
    full = tmp_path / "full.wav"
    full.symlink_to("/dev/full")
    err = one_line(capsys, "synth", "hi", "-o", full, "--model", tiny_ckpt, "--max-semantic-tokens", "4",
                   "--dtype", "float32")
    assert "No space left on device" in err and str(full) in err


def test_configs_that_are_not_text_or_too_deep(capsys, tmp_path):
    cases = {"binary.yaml": (b"\xff\xfe\x00bin", "not a text file"),
             "deep.yaml": (b"[" * 10_000, "nested too deeply"),
             "syntax.yaml": (b"semantic: {max_batch: [1,\n", "not valid YAML (line")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert message in one_line(capsys, "render-config", "--config", tmp_path / name), name


def test_make_checkpoint_never_writes_over_a_folder_it_did_not_make(capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.safetensors").write_bytes(b"a real checkpoint's weights")
    assert "not empty" in one_line(capsys, "make-checkpoint", real)
    assert (real / "model.safetensors").read_bytes() == b"a real checkpoint's weights"
    (tmp_path / "file").write_text("x")
    assert "not a directory" in one_line(capsys, "make-checkpoint", tmp_path / "file")
    ours = tmp_path / "ours"
    for _ in range(2):  # a random checkpoint it made may be made again in place
        code, err = run(capsys, "make-checkpoint", ours, "--no-voice-cloning")
        assert code == 0, err


def test_a_checkpoint_whose_voice_index_is_not_json(capsys, tiny_ckpt, tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "speaker_embeddings_path.json").write_text("not json")
    assert "is not a voice index" in one_line(capsys, "voices", "--model", broken)


def test_batch_submit_refuses_a_foreign_failed_list(capsys, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "text": "hi"}\n')
    for content in ("garbage\n", '{"x": 1}\n'):
        out = tmp_path / f"out{len(content)}"
        out.mkdir()
        (out / "failed.jsonl").write_text(content)
        err = one_line(capsys, "batch", "submit", items, "--out", out, "--url", "http://127.0.0.1:9")
        assert "failed.jsonl:1 is not a record" in err


def test_dataset_refuses_bad_inputs_outputs_and_addresses_before_ray(capsys, tiny_ckpt, tmp_path):
    model = ["--model", tiny_ckpt]
    (tmp_path / "x.parquet").write_text("hello")
    assert "cannot be read as Parquet" in one_line(capsys, "dataset", tmp_path / "x.parquet", "--out",
                                                   tmp_path / "o1", *model)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "hi"}) + "\n")
    foreign = tmp_path / "o2"
    foreign.mkdir()
    pq.write_table(pa.table({"something": [1, 2]}), foreign / "manifest.parquet")
    assert "not a bark-serve dataset manifest" in one_line(capsys, "dataset", src, "--out", foreign, *model)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = one_line(capsys, "dataset", src, "--out", tmp_path / "o3", "--address", f"127.0.0.1:{port}", *model)
    assert "cannot reach Ray" in err
    assert "is not HOST:PORT" in one_line(capsys, "dataset", src, "--out", tmp_path / "o4", "--address", "nowhere",
                                          *model)


def test_an_internal_failure_is_one_line_and_the_trace_is_on_demand(capsys, monkeypatch, tmp_path):
    """The last net of main(): an exception no command turned into a message."""
    from bark_serve.cli import commands

    def broken(args):
        raise RuntimeError("something\ninside broke")

    monkeypatch.setattr(commands, "render_config", broken)
    err = one_line(capsys, "render-config", code=1)
    assert "RuntimeError: something inside broke (set BARK_DEBUG=1 for the traceback)" in err
    monkeypatch.setenv("BARK_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["render-config"])


def test_voice_clone_finds_the_checkpoints_own_cloning_weights(capsys, tiny_ckpt, tmp_path):
    """`--model CKPT` alone uses CKPT/voice_cloning/ (as the server does), not the hub; a quantizer that is not
    one (any file at all) is one line."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(2.5 * 24_000)) / 24_000
    clip = tmp_path / "me.wav"
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000)
    code, err = run(capsys, "voice", "clone", clip, "-o", tmp_path / "me.npz", "--model", tiny_ckpt)
    assert code == 0, err
    assert (tmp_path / "me.npz").stat().st_size > 0
    err = one_line(capsys, "voice", "clone", clip, "-o", tmp_path / "v.npz", "--model", tiny_ckpt, "--quantizer",
                   Path(__file__))
    assert "not a readable quantizer" in err
