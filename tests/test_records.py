"""Run records survive a writer killed mid-line."""

from jaxrepro.records import append_jsonl, read_jsonl, write_jsonl


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "steps.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2})
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # what a SIGKILL mid-write leaves
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    write_jsonl(path, read_jsonl(path))
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / "steps.tmp").exists()


def test_missing_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
