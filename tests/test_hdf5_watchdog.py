"""Issue 14: HDF5 readers run in a watchdog child (subspace_cli.hdf5.isolated), so that a
crafted file that makes libhdf5 loop, crash or take gigabytes is one InputError line, and
their results come back as data.

The readers here stand in for libhdf5's failures (a SIGSEGV, a sleep, a huge allocation); the
fuzz tests run the real readers on damaged files under the same watchdog, including the inputs
that made libhdf5 itself hang and crash."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from subspace_cli import hdf5
from subspace_cli.errors import InputError, UsageError
from subspace_cli.store import Spectrum


@pytest.fixture
def target(tmp_path) -> Path:
    path = tmp_path / "file.h5"
    path.write_bytes(b"\0" * 1000)
    return path


def _pids(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def _note_pid(log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_reader_runs_only_in_a_child_and_its_result_comes_back_as_data(target, tmp_path):
    log = tmp_path / "pids"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 7))

    @hdf5.isolated("spectra file")
    def reader(path: Path, scale: int) -> Spectrum:
        _note_pid(log)
        return Spectrum(
            checkpoint="a.safetensors", checkpoint_sha256="ab" * 32, k=3,
            eigenvalues=np.array([3.0, np.nan, -np.inf]), eigenvectors=vectors * scale,
            residuals=np.float32([1e-9, 2e-9, 3e-9]), converged=np.array([True, False, True]),
            param_names=np.array(["w", "é"], dtype=object), param_shapes=[(2, 3), (1,)],
            param_offsets=[0, 6],
            attrs={"step": np.int64(7), "lr": 0.1, "none": None, "blob": b"\0\1",
                   "config": {"widths": [200, 200]}, "empty": np.zeros((0, 2))},
            group=path.name)

    got = reader(target, scale=2)
    (child,) = _pids(log)
    assert child != os.getpid()  # it never ran here
    assert got.group == "file.h5" and got.k == 3 and got.param_shapes == [(2, 3), (1,)]
    assert got.eigenvectors.tobytes() == (vectors * 2).tobytes()  # bit for bit
    assert got.eigenvectors.flags.writeable and got.eigenvectors.flags.aligned
    assert got.residuals.dtype == np.float32 and got.converged.dtype == np.bool_
    np.testing.assert_array_equal(got.eigenvalues, [3.0, np.nan, -np.inf])
    assert list(got.param_names) == ["w", "é"] and got.param_names.dtype == object
    assert got.attrs["step"] == 7 and type(got.attrs["step"]) is np.int64
    assert got.attrs["blob"] == b"\0\1" and got.attrs["none"] is None
    assert got.attrs["config"] == {"widths": [200, 200]} and got.attrs["empty"].shape == (0, 2)


def test_a_result_that_is_not_data_is_a_bug_not_a_pickle(target):
    @hdf5.isolated("run file")
    def reader(path: Path) -> object:
        return object()

    with pytest.raises(hdf5.ReaderBug, match="TypeError: a object cannot leave the watchdog"):
        reader(target)


def test_an_exception_that_is_not_ours_is_a_bug_with_the_childs_traceback(target):
    @hdf5.isolated("run file")
    def reader(path: Path) -> None:
        {}["missing key"]

    with pytest.raises(hdf5.ReaderBug) as e:
        reader(target)
    assert "in reader" in str(e.value) and "KeyError: 'missing key'" in str(e.value)


def test_our_error_in_the_child_is_raised_here_without_a_second_run(target, tmp_path):
    log = tmp_path / "pids"

    @hdf5.isolated("test file")
    def reader(path: Path) -> None:
        _note_pid(log)
        raise UsageError(f"{path}: holds no spectrum of x.safetensors")

    with pytest.raises(UsageError, match=r"file\.h5: holds no spectrum of x\.safetensors$") as e:
        reader(target)
    assert e.value.exit_code == 2
    assert len(_pids(log)) == 1 and _pids(log)[0] != os.getpid()


def test_a_crash_in_the_child_is_a_damaged_file_not_a_dead_process(target, tmp_path):
    log = tmp_path / "pids"

    @hdf5.isolated("run file")
    def reader(path: Path) -> None:
        _note_pid(log)
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(InputError) as e:
        reader(target)
    assert str(e.value) == (f"{target}: a damaged run file (reading it crashed the HDF5 "
                            "library: SIGSEGV)")
    assert len(_pids(log)) == 1 and _pids(log)[0] != os.getpid()


def test_a_hang_in_the_child_ends_at_the_deadline_and_the_child_is_killed(
        target, tmp_path, monkeypatch):
    monkeypatch.setenv(hdf5.TIMEOUT_ENV, "0.5")
    log = tmp_path / "pids"

    @hdf5.isolated("spectra file")
    def reader(path: Path) -> None:
        _note_pid(log)
        time.sleep(600)

    started = time.monotonic()
    with pytest.raises(InputError, match=r"a damaged spectra file \(reading it did not "
                                         r"finish in 0\.5 s; set SUBSPACE_READ_TIMEOUT"):
        reader(target)
    assert time.monotonic() - started < 5
    (child,) = _pids(log)
    assert _gone(child)


def test_the_deadline_grows_with_the_bytes_to_read(monkeypatch):
    monkeypatch.delenv(hdf5.TIMEOUT_ENV, raising=False)
    assert hdf5.timeout(0) == 60.0
    assert hdf5.timeout(2_000_000_000) == pytest.approx(160.0)
    monkeypatch.setenv(hdf5.TIMEOUT_ENV, "not a number")
    assert hdf5.timeout(0) == 60.0


def test_memory_in_the_child_is_bounded_by_the_files_size(target, tmp_path):
    log = tmp_path / "pids"

    @hdf5.isolated("run file")
    def reader(path: Path) -> int:
        _note_pid(log)
        return len(bytearray(1 << 30))  # a 1000-byte file may take 256 MiB + 16 kB

    with pytest.raises(InputError, match=r"file\.h5: a damaged run file \(reading it needs "
                                         r"more than 256 MiB of memory\)$"):
        reader(target)
    assert len(_pids(log)) == 1 and _pids(log)[0] != os.getpid()
    assert hdf5.memory_budget(1000) == (256 << 20) + 16_000


def test_nested_readers_fork_once(target, tmp_path):
    log = tmp_path / "pids"

    @hdf5.isolated("spectra file")
    def inner(path: Path) -> int:
        _note_pid(log)
        return 1

    @hdf5.isolated("spectra file")
    def outer(path: Path) -> int:
        return inner(path) + 1

    assert outer(target) == 2
    (child,) = _pids(log)  # inner ran directly in the outer reader's child
    assert child != os.getpid()


def test_a_signal_while_waiting_kills_the_child(target, tmp_path):
    log = tmp_path / "pids"

    class Alarm(Exception):
        pass

    def ring(signum, frame):
        raise Alarm

    @hdf5.isolated("run file")
    def reader(path: Path) -> None:
        _note_pid(log)
        time.sleep(600)

    previous = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Alarm):
            reader(target)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    (child,) = _pids(log)
    assert _gone(child)


def test_a_missing_file_is_the_readers_own_business(tmp_path):
    calls = []

    @hdf5.isolated("run file")
    def reader(path: Path) -> None:
        calls.append(os.getpid())
        raise InputError(f"{path}: no such file")

    with pytest.raises(InputError, match="no such file"):
        reader(tmp_path / "absent.h5")
    assert calls == [os.getpid()]  # no child for a file that is not there


def test_no_process_for_the_watchdog_is_one_line_not_a_bug(target, monkeypatch):
    import errno

    from subspace_cli.errors import SubspaceError

    def no_fork():
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    @hdf5.isolated("run file")
    def reader(path: Path) -> int:
        return 1

    monkeypatch.setattr(hdf5.os, "fork", no_fork)
    with pytest.raises(SubspaceError) as e:
        reader(target)
    assert e.value.exit_code == 2
    assert str(e.value) == (f"cannot read {target}: no process could be started to read it "
                            f"({os.strerror(errno.EAGAIN)})")
