"""llmcore.io: atomic file and directory writes keep the old content when the writer fails, and
respect the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from llmcore import io


class Boom(Exception):
    pass


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_text_json_bytes_replace_content_and_leave_no_temp(tmp_path):
    p = tmp_path / "a.json"
    io.write_json(p, {"x": "é", "n": 1})
    assert p.read_text(encoding="utf-8") == '{\n  "x": "é",\n  "n": 1\n}\n'
    io.write_text(p, "second\n")
    assert p.read_text() == "second\n"
    io.write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_keeps_old_content_when_the_writer_raises(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        raise Boom

    seen = []
    with pytest.raises(Boom):
        io.atomic_write(p, lambda tmp: (seen.append(tmp), half_then_fail(tmp)))
    # the temp file is beside the target and keeps its suffix (matplotlib picks the format by it)
    assert (
        seen[0].parent == tmp_path
        and seen[0].name.startswith(".model.safetensors.")
        and seen[0].suffix == ".safetensors"
    )
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model.safetensors"]
    with pytest.raises(Boom):
        io.atomic_write(tmp_path / "new.bin", half_then_fail)  # a target that did not exist stays absent
    assert not (tmp_path / "new.bin").exists()


def test_write_text_keeps_old_content_when_encoding_fails(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        io.write_text(p, "中文", encoding="ascii")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["t.txt"]


def test_files_and_dirs_get_the_umask_not_0600(tmp_path, umask_027):
    io.write_text(tmp_path / "t.txt", "x")
    io.atomic_write(tmp_path / "w.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert _mode(tmp_path / "t.txt") == 0o640 and _mode(tmp_path / "w.bin") == 0o640
    with io.atomic_dir(tmp_path / "d") as tmp:
        io.write_text(tmp / "f", "x")
    assert _mode(tmp_path / "d") == 0o750 and _mode(tmp_path / "d" / "f") == 0o640
    os.umask(0o002)
    io.write_text(tmp_path / "t.txt", "y")
    assert _mode(tmp_path / "t.txt") == 0o664


def test_atomic_dir_builds_beside_and_replaces_as_a_whole(tmp_path):
    out = tmp_path / "shards"
    with io.atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".shards.tmp-") and not out.exists()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with io.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(x.name for x in out.iterdir()) == ["b"]  # the old dir is gone as a whole
    assert sorted(x.name for x in tmp_path.iterdir()) == ["shards"]


def test_atomic_dir_keeps_the_old_dir_when_the_writer_raises(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(Boom):
        with io.atomic_dir(out) as tmp:
            (tmp / "keep").write_text("new, half")
            raise Boom
    assert [x.name for x in out.iterdir()] == ["keep"] and (out / "keep").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]
    with pytest.raises(Boom):
        with io.atomic_dir(tmp_path / "fresh"):
            raise Boom
    assert not (tmp_path / "fresh").exists()


def test_install_dir_and_file_and_leftover_cleanup(tmp_path):
    tmp = tmp_path / ".step-3.tmp"
    tmp.mkdir()
    io.write_json(tmp / "trainer_state.json", {"step": 3})
    io.install_dir(tmp, tmp_path / "step-3")
    assert json.loads((tmp_path / "step-3" / "trainer_state.json").read_text()) == {"step": 3} and not tmp.exists()
    src = tmp_path / "dl"
    src.write_text("data")
    io.install_file(src, tmp_path / "final.jsonl")
    assert (tmp_path / "final.jsonl").read_text() == "data" and not src.exists()
    # what a kill would leave: a file temp, a dir temp, a displaced old dir
    (tmp_path / ".final.jsonl.abc123.tmp.jsonl").write_text("partial")
    (tmp_path / ".out.tmp-1234abcd").mkdir()
    (tmp_path / ".out.old-1234abcd.tmp").mkdir()
    assert len(io.remove_leftovers(tmp_path, "final.jsonl")) == 1 and len(io.remove_leftovers(tmp_path, "out")) == 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["final.jsonl", "step-3"]
