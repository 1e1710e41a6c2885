"""atomic_write: a reader sees the old file or the new one, never a partial one."""

import pytest

from llmfn.files import atomic_write


def test_replaces_the_file_whole_and_creates_directories(tmp_path):
    path = tmp_path / "a" / "b" / "config.json"
    with atomic_write(path) as f:
        f.write("first 小猫\n")
    with atomic_write(path, binary=True) as f:
        f.write(b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary left


def test_an_error_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]
