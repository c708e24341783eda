"""Converted copies of GGUF checkpoints (services/engine/converted.py): named by their source, published whole,
the first to land kept, and a load that goes on where none can be written. Then the real one: the embedded
SmolLM2's copy is the GGUF model, weight for weight, with the same tokenizer. Between processes: one converts
while the others wait for its copy, and copies no load has used for a week are pruned."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.engine import converted, models
from services.engine.headmap import shipped_head_map

CONVERTER = "transformers 0, gguf 0"


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def writer(text: str, calls: list | None = None):
    def write(directory):
        (directory / "weights.txt").write_text(text)
        if calls is not None:
            calls.append(directory)
    return write


def test_a_published_copy_is_found_by_its_source_and_converter(source, tmp_path):
    root = tmp_path / "cache"
    assert converted.lookup(source, CONVERTER, root) is None
    copy = converted.publish(source, CONVERTER, writer("one"), root)
    assert converted.lookup(source, CONVERTER, root) == copy and (copy / "weights.txt").read_text() == "one"
    manifest = json.loads((copy / converted.MANIFEST).read_text())
    assert manifest["converted_from"] == str(source.resolve()) and manifest["converter"] == CONVERTER
    assert converted.lookup(source, "transformers 1, gguf 0", root) is None      # an upgrade converts again
    assert [p.name for p in root.iterdir()] == [copy.name]                       # no partial copy left


def test_a_changed_source_is_not_served_its_old_copy(source, tmp_path):
    root = tmp_path / "cache"
    converted.publish(source, CONVERTER, writer("old"), root)
    source.write_bytes(b"GGUF" + bytes(59) + b"!")                               # same size, new content
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert converted.lookup(source, CONVERTER, root) is None


def test_the_same_file_elsewhere_shares_the_copy(source, tmp_path):
    root = tmp_path / "cache"
    copy = converted.publish(source, CONVERTER, writer("one"), root)
    elsewhere = tmp_path / "other-venv" / source.name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(source.read_bytes())                                   # another install: a new mtime
    assert converted.lookup(elsewhere, CONVERTER, root) == copy


def test_the_first_copy_to_land_is_kept(source, tmp_path):
    root = tmp_path / "cache"
    first = converted.publish(source, CONVERTER, writer("first"), root)
    calls: list = []
    second = converted.publish(source, CONVERTER, writer("second", calls), root)
    assert calls and second == first and (first / "weights.txt").read_text() == "first"
    assert not calls[0].exists()                                                 # the loser's copy is removed


@pytest.mark.parametrize("blocked", ["root is a file", "writer fails"])
def test_a_copy_that_cannot_be_written_leaves_nothing_and_raises_nothing(source, tmp_path, blocked):
    root = tmp_path / "cache"
    if blocked == "root is a file":
        root.write_text("not a directory")
        write = writer("x")
    else:
        def write(directory):
            (directory / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert converted.publish(source, CONVERTER, write, root) is None
    assert converted.lookup(source, CONVERTER, root) is None
    assert root.is_file() or list(root.iterdir()) == []


def test_stale_partial_copies_are_swept(source, tmp_path):
    root = tmp_path / "cache"
    final = converted.copy_dir(source, CONVERTER, root)
    root.mkdir()
    stale, fresh = root / f".{final.name}-dead", root / f".{final.name}-writing"
    stale.mkdir(), fresh.mkdir()
    old = time.time() - converted.STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    converted.publish(source, CONVERTER, writer("x"), root)
    assert not stale.exists() and fresh.exists()


# A process that obtains a copy: converted.py loaded by its path (it imports only the standard library), so
# each starts in a fraction of a second; "converted" is printed by the one that converted.
OBTAINER = """
import importlib.util, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spec = importlib.util.spec_from_file_location("converted", sys.argv[1])
converted = importlib.util.module_from_spec(spec)
spec.loader.exec_module(converted)
source, root = Path(sys.argv[2]), Path(sys.argv[3])

def convert():
    print("converted", flush=True)
    time.sleep(0.3)   # the others are waiting for the lock meanwhile
    return "weights"

text = converted.obtain(source, "transformers 0, gguf 0", read=lambda d: (d / "weights.txt").read_text(),
                        convert=convert, save=lambda text, d: (d / "weights.txt").write_text(text), root=root)
print("got", text, flush=True)
"""


def obtainer(source: Path, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", OBTAINER, converted.__file__, str(source), str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_waiting(process: subprocess.Popen) -> None:
    """Read the process's log until it says it waits for the lock (EOF first: it never waited, and the test fails)."""
    for line in process.stderr:
        if "waiting for another process converting" in line:
            return
    pytest.fail(f"the process never waited for the lock: {process.communicate()}")


def test_one_process_converts_while_the_others_wait_for_its_copy(source, tmp_path):
    root = tmp_path / "cache"
    with converted.converting(source, CONVERTER, root):   # held here until all three are queued behind it
        processes = [obtainer(source, root) for _ in range(3)]
        for process in processes:
            wait_until_waiting(process)
    outputs = [process.communicate(timeout=60)[0].split() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert sorted(outputs) == [["converted", "got", "weights"], ["got", "weights"], ["got", "weights"]]
    assert (converted.lookup(source, CONVERTER, root) / "weights.txt").read_text() == "weights"


def test_a_converter_held_too_long_is_not_waited_for(monkeypatch, source, tmp_path, caplog):
    root = tmp_path / "cache"
    monkeypatch.setattr(converted, "CONVERT_WAIT_S", 0.3)
    with converted.converting(source, CONVERTER, root):   # a stuck converter: its lock is never released
        text = converted.obtain(source, CONVERTER, read=lambda d: (d / "weights.txt").read_text(),
                                convert=lambda: "weights", save=lambda text, d: (d / "weights.txt").write_text(text),
                                root=root)
    assert text == "weights" and "converting it here too" in caplog.text


def test_an_unwritable_cache_still_converts(source, tmp_path):
    root = tmp_path / "cache"
    root.write_text("not a directory")
    assert converted.obtain(source, CONVERTER, read=lambda d: "copy", convert=lambda: "converted",
                            save=lambda text, d: None, root=root) == "converted"


def test_copies_no_load_used_for_a_week_are_pruned_when_a_new_one_lands(source, tmp_path):
    root = tmp_path / "cache"
    upgraded_away = converted.publish(source, "transformers 0, gguf 0", writer("old"), root)
    still_loaded = converted.publish(source, "transformers 1, gguf 0", writer("used"), root)
    week_ago = time.time() - converted.UNUSED_PRUNE_S - 60
    for copy in (upgraded_away, still_loaded):
        os.utime(copy / converted.MANIFEST, (week_ago, week_ago))
    assert converted.lookup(source, "transformers 1, gguf 0", root) == still_loaded   # a load renews its stamp
    new = converted.publish(source, "transformers 2, gguf 0", writer("new"), root)
    assert not upgraded_away.exists() and still_loaded.exists() and new.exists()
    assert not [p for p in root.iterdir() if "discarded" in p.name]


def test_a_damaged_copy_is_converted_again(monkeypatch, source, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    converter = models.gguf_converter()
    damaged = converted.publish(source, converter, writer("garbage"))
    loads = []

    def from_directory(directory, dtype, gguf_file=None):
        loads.append((directory, gguf_file))
        if gguf_file is None:
            raise OSError("not a checkpoint")
        return "model", "tokenizer"

    monkeypatch.setattr(models, "_from_directory", from_directory)
    monkeypatch.setattr(models, "_save_checkpoint", lambda model, tok, d: (d / "weights.txt").write_text("fresh"))
    assert models._load_gguf(source) == ("model", "tokenizer")
    assert loads == [(damaged, None), (source.parent, source.name)]
    assert (converted.lookup(source, converter) / "weights.txt").read_text() == "fresh"


@pytest.mark.slow
def test_the_embedded_models_copy_is_the_gguf_model_and_tokenizer():
    """The shipped head map is bound to the fingerprint of SmolLM2 as loaded from its GGUF file (its config and a
    strided sample of every weight), so finding it proves the copy's weights without dequantising them again
    (~35 s here; a whole-weight comparison found every tensor equal, 2026-12-07)."""
    loaded = models.load_model("smollm2", "cpu")              # the copy (written by this load if there was none)
    path = models.embedded_model_dir() / models.EMBEDDED_GGUF
    assert converted.lookup(path, models.gguf_converter()) is not None
    assert shipped_head_map(loaded.fingerprint) is not None
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    texts = ["The pass key is 12345.", "  tabs\tand\n\nnewlines ünïcödé 漢字 🙂", "<|im_start|>user\nhi<|im_end|>"]
    assert [loaded.tokenizer.encode(t) for t in texts] == [gguf_tok.encode(t) for t in texts]
    chat = [{"role": "user", "content": "hi"}]
    assert (loaded.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert loaded.tokenizer.all_special_tokens == gguf_tok.all_special_tokens
    assert models.embedded_tokenizer().encode(texts[1]) == gguf_tok.encode(texts[1])   # tiny-random's, from the copy
