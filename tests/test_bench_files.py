"""bench/_files.write_json: the scripts that rewrite their JSON after every case (the GPU
check kills a stage at its time limit) must never leave, or show, half a file."""

import json
import random
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def write_json(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from _files import write_json
    return write_json


def is_whole(text: str, reports: list) -> bool:
    try:
        return json.loads(text) in reports
    except ValueError:
        return False


def test_a_reader_sees_only_whole_files_while_the_file_is_rewritten(write_json, tmp_path):
    path = tmp_path / "sub" / "report.json"
    reports = [{"cases": [random.random() for _ in range(random.randint(5_000, 10_000))]}
               for _ in range(3)]
    write_json(path, reports[0])
    seen, done = [], threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(is_whole(path.read_text(), reports))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            write_json(path, reports[i % 3])
    finally:
        done.set()
        reader.join()
    assert seen
    assert all(seen)
    assert json.loads(path.read_text()) == reports[39 % 3]
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_value_that_cannot_be_written_leaves_the_last_file(write_json, tmp_path):
    path = tmp_path / "report.json"
    kept = {"value": random.random()}
    write_json(path, kept)
    with pytest.raises(TypeError):
        write_json(path, {"value": object()})
    assert json.loads(path.read_text()) == kept
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
