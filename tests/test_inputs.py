from __future__ import annotations

from subspace_cli.inputs import expand_inputs


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_files_directories_and_globs(tmp_path):
    a = _touch(tmp_path / "a.safetensors")
    b = _touch(tmp_path / "run" / "step_1.safetensors")
    c = _touch(tmp_path / "run" / "deep" / "step_2.safetensors")
    _touch(tmp_path / "run" / "notes.txt")
    got = expand_inputs([str(a), str(tmp_path / "run"), str(tmp_path / "*.safetensors")])
    assert [i.path for i in got] == [a, c, b]  # sorted within a directory, no duplicate of a
    assert all(i.error is None for i in got)


def test_missing_inputs_become_errors_in_place(tmp_path):
    a = _touch(tmp_path / "a.safetensors")
    (tmp_path / "empty").mkdir()
    got = expand_inputs(
        [
            str(tmp_path / "nope.safetensors"),
            str(a),
            str(tmp_path / "x*.st"),
            str(tmp_path / "empty"),
        ]
    )
    assert [i.path for i in got] == [None, a, None, None]
    assert "no such file" in got[0].error
    assert "matched no files" in got[2].error
    assert "no *.safetensors files" in got[3].error
