"""read_last_checkpoint: the one reader of mmengine's ``last_checkpoint`` file."""

import os
import subprocess
import sys

import pytest

from vitasks.errors import CheckpointError, VitasksError
from vitasks.last_checkpoint import LAST_CHECKPOINT, read_last_checkpoint


def _work_dir(tmp_path, content=None, checkpoints=("epoch_2.pth",)):
    work = tmp_path / "work"
    work.mkdir()
    for name in checkpoints:
        (work / name).write_bytes(b"weights")
    if content is not None:
        (work / "last_checkpoint").write_text(content, encoding="utf-8")
    return work


def test_absolute_path_is_returned_as_written(tmp_path):
    work = _work_dir(tmp_path)
    target = str(work / "epoch_2.pth")
    (work / "last_checkpoint").write_text(target)
    assert read_last_checkpoint(str(work)) == target


def test_trailing_newline_and_spaces_are_stripped(tmp_path):
    work = _work_dir(tmp_path)
    target = str(work / "epoch_2.pth")
    (work / "last_checkpoint").write_text(f"  {target}\n\n")
    assert read_last_checkpoint(str(work)) == target


def test_relative_path_from_another_directory_is_found_in_the_work_dir(tmp_path, monkeypatch):
    # The trainer ran in tmp_path/"train_cwd" and wrote a path relative to it; we read from elsewhere.
    work = _work_dir(tmp_path, content="work_dirs/run/epoch_2.pth\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_last_checkpoint(str(work)) == os.path.join(str(work), "epoch_2.pth")


def test_bare_file_name_is_resolved_against_the_work_dir(tmp_path, monkeypatch):
    work = _work_dir(tmp_path, content="epoch_2.pth")
    monkeypatch.chdir(tmp_path)  # no epoch_2.pth here
    assert read_last_checkpoint(str(work)) == os.path.join(str(work), "epoch_2.pth")


def test_relative_path_valid_from_the_current_directory_is_kept(tmp_path, monkeypatch):
    work = _work_dir(tmp_path, content="work/epoch_2.pth")
    monkeypatch.chdir(tmp_path)
    path = read_last_checkpoint(str(work))
    assert path == "work/epoch_2.pth"
    assert os.path.samefile(path, work / "epoch_2.pth")


def test_moved_work_dir_is_found_by_basename(tmp_path):
    work = _work_dir(tmp_path, content=str(tmp_path / "old_place" / "epoch_2.pth"))
    assert read_last_checkpoint(str(work)) == os.path.join(str(work), "epoch_2.pth")


def test_a_checkpoint_found_nowhere_is_returned_as_written(tmp_path):
    # Whether it exists is the caller's question (a resume falls back to an earlier checkpoint).
    gone = str(tmp_path / "gone" / "epoch_9.pth")
    work = _work_dir(tmp_path, content=gone)
    assert read_last_checkpoint(str(work)) == gone
    assert read_last_checkpoint(str(work), required=False) == gone


def test_missing_file_required_names_the_file_and_its_writer(tmp_path):
    work = _work_dir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        read_last_checkpoint(str(work))
    message = str(info.value)
    assert os.path.join(str(work), "last_checkpoint") in message
    assert "tools/train.py" in message and "CheckpointHook" in message
    assert isinstance(info.value, VitasksError)


def test_missing_file_not_required_is_none(tmp_path):
    work = _work_dir(tmp_path)
    assert read_last_checkpoint(str(work), required=False) is None
    assert read_last_checkpoint(str(tmp_path / "no_such_dir"), required=False) is None


@pytest.mark.parametrize("content", ["", "\n", "  \n "])
@pytest.mark.parametrize("required", [True, False])
def test_empty_file_is_an_error_naming_it(tmp_path, content, required):
    work = _work_dir(tmp_path, content=content)
    with pytest.raises(CheckpointError, match="empty") as info:
        read_last_checkpoint(str(work), required=required)
    assert os.path.join(str(work), "last_checkpoint") in str(info.value)


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    work = _work_dir(tmp_path)
    (work / "last_checkpoint").mkdir()  # a folder where the file should be
    with pytest.raises(CheckpointError) as info:
        read_last_checkpoint(str(work), required=False)
    assert os.path.join(str(work), "last_checkpoint") in str(info.value)


def test_reads_what_the_hooks_write_and_one_name_everywhere(tmp_path):
    from vitasks.engine import hooks, runner

    assert LAST_CHECKPOINT == "last_checkpoint"  # mmengine's name (find_latest_checkpoint)
    assert runner.LAST_CHECKPOINT is LAST_CHECKPOINT and hooks.LAST_CHECKPOINT is LAST_CHECKPOINT
    assert runner.read_last_checkpoint is read_last_checkpoint
    work = _work_dir(tmp_path)
    target = str(work / "epoch_2.pth")
    hooks.write_text_atomic(str(work / LAST_CHECKPOINT), target)
    assert read_last_checkpoint(str(work)) == target
    from mmengine.runner.checkpoint import find_latest_checkpoint

    assert find_latest_checkpoint(str(work)) == read_last_checkpoint(str(work))


def test_import_is_light():
    # tools/seeds.py reads the file without loading torch or the Runner.
    code = ("import sys, vitasks.last_checkpoint, vitasks.benchmarks.seeds; "
            "print(sorted(m for m in ('torch', 'mmengine', 'vitasks.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
