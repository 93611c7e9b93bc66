"""The spectra file's layout (format 1.1): an index of external links to one file per group.

Appending costs O(the group); format 1.0 files (groups inline) are read and appended to without
being copied; a writer killed at any moment leaves every earlier group readable; a full disk is
one line with exit code 2 and loses nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from subspace_cli import store
from subspace_cli.errors import InputError, StorageError, UsageError

TESTS = Path(__file__).resolve().parent


def make_spectrum(name: str, n: int = 1000, k: int = 3, seed: int = 0) -> store.Spectrum:
    rng = np.random.default_rng(seed)
    return store.Spectrum(
        checkpoint=name,
        checkpoint_sha256=hashlib.sha256(name.encode()).hexdigest(),
        k=k,
        eigenvalues=np.sort(rng.random(k))[::-1] + seed,
        # random normal floats: gzip and shuffle save only ~14% (~3.4·k·n bytes on disk)
        eigenvectors=rng.standard_normal((k, n)).astype(np.float32),
        residuals=rng.random(k) * 1e-6,
        converged=np.ones(k, dtype=bool),
        param_names=["w"],
        param_shapes=[(n,)],
        param_offsets=[0],
        attrs={"created": f"2026-01-01T00:00:{seed:02d}", "loss": "mse"},
    )


def assert_same(stored: store.Spectrum, expected: store.Spectrum) -> None:
    assert stored.checkpoint == expected.checkpoint
    assert stored.checkpoint_sha256 == expected.checkpoint_sha256
    np.testing.assert_array_equal(stored.eigenvalues, expected.eigenvalues)
    np.testing.assert_array_equal(stored.eigenvectors, expected.eigenvectors)
    np.testing.assert_array_equal(stored.residuals, expected.residuals)


def group_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(store.sidecar(path)) if n != ".lock")


def temporaries(path: Path) -> list[str]:
    names = [n for n in os.listdir(store.sidecar(path)) if n.endswith(".tmp")]
    return names + [n for n in os.listdir(path.parent) if n.endswith(".tmp")]


def bytes_written() -> int:
    """Bytes this process has passed to write(2) and friends so far (Linux)."""
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("wchar:")).split()[1])


needs_proc_io = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")


def write_legacy(path: Path, spectra: list[store.Spectrum]) -> None:
    """A format 1.0 file exactly as docs/format.md 1.0 describes it: every group inline."""
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "subspace-spectra"
        f.attrs["format_version"] = "1.0"
        for s in spectra:
            g = f.create_group(store.checkpoint_key(s.checkpoint))
            g.attrs["encoding-type"] = "spectrum"
            g.attrs["encoding-version"] = "1.0"
            g.attrs["checkpoint"] = s.checkpoint
            g.attrs["checkpoint_sha256"] = s.checkpoint_sha256
            g.attrs["k"] = s.k
            for name, value in s.attrs.items():
                g.attrs[name] = value
            g.create_dataset("eigenvalues", data=s.eigenvalues)
            g.create_dataset("residuals", data=s.residuals)
            g.create_dataset("converged", data=s.converged)
            n = s.eigenvectors.shape[1]
            g.create_dataset("eigenvectors", data=s.eigenvectors, chunks=(1, min(n, 262144)),
                             compression="gzip", shuffle=True)
            g.create_dataset("param_names", data=np.array(s.param_names, dtype=object), dtype=text)
            g.create_dataset("param_shapes", dtype=text, data=np.array(
                [json.dumps(list(shape)) for shape in s.param_shapes], dtype=object))
            g.create_dataset("param_offsets", data=np.array([*s.param_offsets, n], dtype=np.int64))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ append cost


@needs_proc_io
def test_append_writes_one_group_and_leaves_the_others_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    spectra = [make_spectrum(f"step_{i}.safetensors", n=262_144, k=4, seed=i) for i in range(5)]
    for s in spectra[:4]:
        store.write_spectrum(out, s)
    before = {name: os.stat(store.sidecar(out) / name) for name in group_files(out)}
    stored = sum(st.st_size for st in before.values())
    assert len(before) == 4 and stored > 14e6  # four groups of 3.6 MB

    written = bytes_written()
    store.write_spectrum(out, spectra[4])
    written = bytes_written() - written

    [new] = set(group_files(out)) - set(before)
    new_size = os.path.getsize(store.sidecar(out) / new)
    # the new group file (3.6 MB) and an index of a few KiB: a fifth of what the old recipe
    # wrote (a copy of the whole file, then the group)
    assert new_size < written < new_size + 256 * 1024, (written, new_size)
    assert written < 0.3 * (stored + new_size)
    assert os.path.getsize(out) < 64 * 1024
    for name, st in before.items():
        now = os.stat(store.sidecar(out) / name)
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    for got, expected in zip(store.iter_spectra(out), spectra, strict=True):
        assert_same(got, expected)


def test_plain_h5py_reads_through_links_from_anywhere_and_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a" / "spectra.h5"
    s = make_spectrum("c.safetensors")
    key = store.write_spectrum(out, s)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with h5py.File("../a/spectra.h5", "r") as f:
        assert f.attrs["format_version"] == "1.1"
        np.testing.assert_array_equal(f[key]["eigenvalues"][()], s.eigenvalues)
        assert f[key].attrs["checkpoint"] == "c.safetensors"

    moved = tmp_path / "b"
    moved.mkdir()
    shutil.move(out, moved / "renamed.h5")  # the index and its directory, together
    shutil.move(store.sidecar(out), moved / "spectra.h5.d")
    [got] = store.iter_spectra(moved / "renamed.h5")
    assert_same(got, s)
    assert got.group == key

    # the index without its directory: a clear error, never a file found elsewhere instead
    lone = tmp_path / "c"
    lone.mkdir()
    shutil.copy(moved / "renamed.h5", lone / "renamed.h5")
    decoy = Path.cwd() / "spectra.h5.d"
    shutil.copytree(moved / "spectra.h5.d", decoy)  # HDF5 would fall back to this one
    with pytest.raises(InputError, match=r"spectra\.h5\.d.*does not exist.*moved or copied"):
        list(store.iter_spectra(lone / "renamed.h5"))


# ----------------------------------------------------------------------------- format 1.0


@needs_proc_io
def test_legacy_inline_file_is_read_and_appended_to_without_a_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    old = [make_spectrum(f"old_{i}.safetensors", n=262_144, k=4, seed=i) for i in range(2)]
    write_legacy(out, old)
    digest, inode, size = sha256_file(out), os.stat(out).st_ino, os.path.getsize(out)
    assert size > 7e6
    for got, expected in zip(store.iter_spectra(out), old, strict=True):
        assert_same(got, expected)
    assert store.has_group(out, "old_1.safetensors")

    new = make_spectrum("new.safetensors", n=1000, seed=5)
    written = bytes_written()
    store.write_spectrum(out, new)
    written = bytes_written() - written
    assert written < 200 * 1024, written  # the new group and the index, not the 7 MB file

    got = list(store.iter_spectra(out))
    assert [s.checkpoint for s in got] == ["old_0.safetensors", "old_1.safetensors",
                                          "new.safetensors"]
    for stored, expected in zip(got, [*old, new], strict=True):
        assert_same(stored, expected)
    # the 1.0 file now lives, unchanged, in the directory (a hard link: the same inode)
    [inline] = [n for n in group_files(out) if n.endswith(".inline")]
    legacy = store.sidecar(out) / inline
    assert os.stat(legacy).st_ino == inode and os.stat(legacy).st_nlink == 1
    assert sha256_file(legacy) == digest
    with h5py.File(out) as f:
        assert f.attrs["format_version"] == "1.1"
        assert all(isinstance(f.get(n, getlink=True), h5py.ExternalLink) for n in f)

    # an alignment result for an inline group rewrites that group only
    store.write_subgroup(out, "old_0.safetensors", "alignment",
                         {"encoding-type": "alignment", "encoding-version": "1.0", "k": 4},
                         {"batch_sizes": np.array([2, 8])})
    attrs, data = store.read_subgroup(out, "old_0.safetensors", "alignment")
    assert attrs["k"] == 4 and data["batch_sizes"].tolist() == [2, 8]
    assert sha256_file(legacy) == digest
    assert_same(store.read_spectrum(out, "old_0.safetensors"), old[0])
    assert_same(store.read_spectrum(out, "old_1.safetensors"), old[1])
    # once every group of the 1.0 file is replaced, the file goes
    store.write_spectrum(out, make_spectrum("old_1.safetensors", seed=7), overwrite=True)
    assert not legacy.exists()
    assert len(list(store.iter_spectra(out))) == 3


def test_legacy_file_is_copied_once_where_hard_links_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    old = [make_spectrum("old.safetensors")]
    write_legacy(out, old)
    digest = sha256_file(out)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(store.os, "link", no_links)
    store.write_spectrum(out, make_spectrum("new.safetensors", seed=1))
    [inline] = [n for n in group_files(out) if n.endswith(".inline")]
    assert sha256_file(store.sidecar(out) / inline) == digest
    assert [s.checkpoint for s in store.iter_spectra(out)] == ["old.safetensors",
                                                              "new.safetensors"]
    assert temporaries(out) == []


def test_a_search_for_spectra_files_finds_the_index_only(tmp_path, monkeypatch):
    """Group files and an adopted 1.0 file are no spectra files of their own: ``subspace report
    DIR`` must not count their groups twice."""
    from subspace_cli.report import classify, load_spectra

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    write_legacy(out, [make_spectrum("old.safetensors")])
    store.write_spectrum(out, make_spectrum("new.safetensors", seed=1))
    assert len(group_files(out)) == 2
    assert classify(tmp_path) == [out]
    assert [e.checkpoint for e in load_spectra(out)] == ["old.safetensors", "new.safetensors"]


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_the_link_and_removes_the_old_group_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    store.write_spectrum(out, make_spectrum("a.safetensors", seed=0))
    store.write_spectrum(out, make_spectrum("b.safetensors", seed=1))
    [old_a, kept_b] = group_files(out)
    with pytest.raises(UsageError, match="pass --overwrite"):
        store.write_spectrum(out, make_spectrum("a.safetensors", seed=2))
    assert group_files(out) == [old_a, kept_b] and temporaries(out) == []

    replacement = make_spectrum("a.safetensors", k=5, seed=2)
    store.write_spectrum(out, replacement, overwrite=True)
    files = group_files(out)
    assert old_a not in files and kept_b in files and len(files) == 2
    assert_same(store.read_spectrum(out, "a.safetensors"), replacement)
    assert store.read_spectrum(out, "a.safetensors").k == 5

    # a subgroup, replaced with --overwrite, is one new file for that group
    attrs = {"encoding-type": "alignment", "encoding-version": "1.0", "k": 2}
    store.write_subgroup(out, "b.safetensors", "alignment", attrs, {"chi": np.array([0.5])})
    with pytest.raises(UsageError, match="pass --overwrite"):
        store.write_subgroup(out, "b.safetensors", "alignment", attrs, {"chi": np.array([0.1])})
    store.write_subgroup(out, "b.safetensors", "alignment", attrs, {"chi": np.array([0.25])},
                         overwrite=True)
    assert kept_b not in group_files(out) and len(group_files(out)) == 2
    assert store.read_subgroup(out, "b.safetensors", "alignment")[1]["chi"].tolist() == [0.25]
    assert_same(store.read_spectrum(out, "b.safetensors"), make_spectrum("b.safetensors", seed=1))
    assert list(store.read_subgroups(out, "alignment")) == ["b.safetensors"]


# ----------------------------------------------------------------------- alignment version


def test_alignment_subgroup_of_a_newer_encoding_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    store.write_spectrum(out, make_spectrum("c.safetensors"))
    store.write_subgroup(out, "c.safetensors", "alignment",
                         {"encoding-type": "alignment", "encoding-version": "1.4", "k": 3},
                         {"chi": np.array([0.5])})
    # a newer minor version is read (its unknown parts ignored) ...
    assert store.read_subgroup(out, "c.safetensors", "alignment")[0]["k"] == 3
    store.write_subgroup(out, "c.safetensors", "alignment",
                         {"encoding-type": "alignment", "encoding-version": "2.0", "k": 3},
                         {"chi": np.array([0.5])}, overwrite=True)
    # ... a newer major version is not
    with pytest.raises(InputError, match=r"c\.safetensors/alignment has alignment encoding 2\.0, "
                                         r"newer than this subspace reads \(1\.0\); upgrade"):
        store.read_subgroup(out, "c.safetensors", "alignment")
    with pytest.raises(InputError, match="alignment encoding 2.0"):
        store.read_subgroups(out, "alignment")


# -------------------------------------------------------------------------- crash safety


def test_a_write_interrupted_at_every_step_loses_nothing(tmp_path, monkeypatch):
    """Interrupt a write at each of its file-system steps (writing, syncing, each rename, the
    removal of a replaced file): the earlier groups always read back unchanged, the new group is
    there entirely or not at all, and no temporary stays."""
    monkeypatch.chdir(tmp_path)
    real = {name: getattr(store, name) for name in ("publish", "_write_file", "_fsync")}
    real_link, real_unlink = os.link, os.unlink
    for scenario in ("append", "overwrite", "legacy"):
        step = 0
        while True:
            step += 1
            out = tmp_path / f"{scenario}-{step}" / "spectra.h5"
            out.parent.mkdir()
            old = [make_spectrum(f"c{i}.safetensors", seed=i) for i in range(2)]
            if scenario == "legacy":
                write_legacy(out, old)
            else:
                for s in old:
                    store.write_spectrum(out, s)
            new = make_spectrum("c0.safetensors" if scenario == "overwrite" else "c2.safetensors",
                                seed=9)
            calls = 0

            def interrupt_at_step(function, step=step):
                def wrapped(*args, **kwargs):
                    nonlocal calls
                    calls += 1
                    if calls == step:
                        raise KeyboardInterrupt
                    return function(*args, **kwargs)
                return wrapped

            with monkeypatch.context() as patch:
                for name, function in real.items():
                    patch.setattr(store, name, interrupt_at_step(function))
                patch.setattr(store.os, "link", interrupt_at_step(real_link))
                patch.setattr(store.os, "unlink", interrupt_at_step(real_unlink))
                try:
                    store.write_spectrum(out, new, overwrite=scenario == "overwrite")
                    finished = True
                except KeyboardInterrupt:
                    finished = False
            got = {s.checkpoint: s for s in store.iter_spectra(out)}
            for s in old:
                if not (scenario == "overwrite" and s.checkpoint == new.checkpoint):
                    assert_same(got[s.checkpoint], s)
            if new.checkpoint not in got:
                assert not finished
            elif got[new.checkpoint].eigenvalues[0] > 9:  # the new group, whole
                assert_same(got[new.checkpoint], new)
            else:  # the group it was to replace, unchanged
                assert_same(got[new.checkpoint], old[0])
            assert temporaries(out) == [], (scenario, step)
            if finished:
                assert new.checkpoint in got and got[new.checkpoint].eigenvalues[0] > 9
                break
        assert step > 5, (scenario, step)  # every step was interrupted once


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_store_layout import make_spectrum
    from subspace_cli import store
    print("ready", flush=True)
    for i in range(1000):
        store.write_spectrum(sys.argv[1], make_spectrum(f"c{i}.safetensors", n=200_000, seed=i))
        print(i, flush=True)
""")


def test_a_writer_killed_at_random_moments_leaves_every_earlier_group_readable(tmp_path):
    rng = np.random.default_rng(13)
    for trial in range(3):
        out = tmp_path / f"trial{trial}" / "spectra.h5"
        out.parent.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(TESTS)],
                                stdout=subprocess.PIPE, text=True, cwd=out.parent,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.02, 0.4)))
        proc.send_signal(signal.SIGKILL)
        done = [int(line) for line in proc.stdout.read().split()]
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        got = {s.checkpoint: s for s in store.iter_spectra(out)} if out.exists() else {}
        for i in done:  # every group whose write returned ...
            assert_same(got[f"c{i}.safetensors"], make_spectrum(f"c{i}.safetensors", n=200_000,
                                                               seed=i))
        # ... and at most the one in flight besides
        assert len(got) - len(done) in (0, 1)
        # the next writer removes what the killed one left
        store.write_spectrum(out, make_spectrum("after.safetensors", seed=99))
        assert temporaries(out) == []
        assert len(list(store.iter_spectra(out))) == len(got) + 1


def test_stale_temporaries_are_never_read_and_the_next_writer_removes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "spectra.h5"
    s = make_spectrum("c.safetensors")
    store.write_spectrum(out, s)
    # what a killed writer leaves: a half group file and a half index
    half = store.sidecar(out) / ".x1y2z3.tmp"
    half.write_bytes(b"\x89HDF\r\n\x1a\n half written")
    index_tmp = tmp_path / ".spectra.h5.abcd1234.tmp"
    shutil.copy(out, index_tmp)
    unrelated = tmp_path / ".spectra.h5.other.abcd1234.tmp"  # another file's temporary
    unrelated.write_bytes(b"")
    assert [x.checkpoint for x in store.iter_spectra(out)] == ["c.safetensors"]
    store.write_spectrum(out, make_spectrum("d.safetensors", seed=1))
    assert not half.exists() and not index_tmp.exists() and unrelated.exists()
    assert [x.checkpoint for x in store.iter_spectra(out)] == ["c.safetensors", "d.safetensors"]


def test_concurrent_writers_lose_no_group(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from test_store_layout import make_spectrum
        from subspace_cli import store
        for i in range(4):
            store.write_spectrum(sys.argv[1], make_spectrum(f"{sys.argv[3]}{i}", seed=i))
    """)
    out = tmp_path / "spectra.h5"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(TESTS), name],
                              cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for name in ("a", "b")]
    assert [p.wait() for p in procs] == [0, 0]
    assert sorted(s.checkpoint for s in store.iter_spectra(out)) == [
        f"{name}{i}" for name in ("a", "b") for i in range(4)]
    assert len(group_files(out)) == 8


# ---------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of 8 MiB (needs root; skipped where mount is refused)."""
    if sys.platform != "linux":
        pytest.skip("needs Linux tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'no mount'})")
    try:
        yield disk
    finally:
        os.chdir(tmp_path)  # a working directory inside keeps the mount busy
        subprocess.run(["umount", str(disk)], check=False)
        if os.path.ismount(disk):
            subprocess.run(["umount", "-l", str(disk)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int) -> None:
    """Leave only ``leave`` bytes free on ``disk``."""
    with open(disk / "filler", "ab") as fh:
        fh.write(b"\0" * max(0, free_bytes(disk) - leave))


def test_full_disk_takes_a_group_that_fits_and_refuses_one_that_does_not(small_disk, monkeypatch):
    monkeypatch.chdir(small_disk)
    out = small_disk / "spectra.h5"
    old = [make_spectrum(f"c{i}.safetensors", n=160_000, k=4, seed=i) for i in range(2)]
    for s in old:
        store.write_spectrum(out, s)
    stored = sum(os.path.getsize(store.sidecar(out) / n) for n in group_files(out))
    fill(small_disk, 1_500_000)
    free = free_bytes(small_disk)
    # (a) less free space than the file holds: copying it, as format 1.0's writer did, fails ...
    assert stored > 4e6 and free < stored / 2
    with pytest.raises(OSError) as copy:
        shutil.copyfile(store.sidecar(out) / group_files(out)[0], small_disk / "copy")
    assert copy.value.errno == errno.ENOSPC
    os.unlink(small_disk / "copy")
    # ... but a group of 0.8 MB is added
    fits = make_spectrum("c2.safetensors", n=50_000, k=4, seed=2)
    store.write_spectrum(out, fits)
    assert [s.checkpoint for s in store.iter_spectra(out)] == [
        "c0.safetensors", "c1.safetensors", "c2.safetensors"]

    # (b) a group of 2.2 MB does not fit: one line, nothing lost, no temporary, space returned
    free = free_bytes(small_disk)
    too_big = make_spectrum("c3.safetensors", n=160_000, k=4, seed=3)
    with pytest.raises(StorageError) as refused:
        store.write_spectrum(out, too_big)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {out}: no space left on device (ENOSPC)")
    assert "unchanged" in message
    assert temporaries(out) == []
    assert free_bytes(small_disk) >= free - 64 * 1024
    for got, expected in zip(store.iter_spectra(out), [*old, fits], strict=True):
        assert_same(got, expected)
    assert not store.has_group(out, "c3.safetensors")

    # a read-only file system: the same kind of line
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(StorageError, match=r"read-only file system \(EROFS\)"):
        store.write_spectrum(out, make_spectrum("c4.safetensors", seed=4))
    assert len(list(store.iter_spectra(out))) == 3


def test_full_disk_through_the_cli_is_exit_2_with_one_line(small_disk, monkeypatch):
    from click.testing import CliRunner
    from test_spectrum_cli import make_checkpoint

    from subspace_cli.cli import main

    monkeypatch.chdir(small_disk)
    out = small_disk / "spectra.h5"
    old = make_spectrum("earlier.safetensors", n=100_000, seed=1)
    store.write_spectrum(out, old)
    ckpt = small_disk / "c.safetensors"
    make_checkpoint(ckpt)
    fill(small_disk, 0)
    result = CliRunner().invoke(main, ["spectrum", str(ckpt), "-k", "2", "-o", str(out)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no space left on device (ENOSPC)" in line
    assert str(out) in line and "internal error" not in line
    [got] = store.iter_spectra(out)
    assert_same(got, old)
    assert temporaries(out) == []


def test_an_environment_refusal_outside_the_store_is_exit_2_not_an_internal_error(
        tmp_path, monkeypatch):
    from click.testing import CliRunner
    from test_spectrum_cli import make_checkpoint

    from subspace_cli.cli import main

    ckpt = tmp_path / "c.safetensors"
    make_checkpoint(ckpt)

    def full(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "spectra.h5"))

    monkeypatch.setattr(store, "write_spectrum", full)
    result = CliRunner().invoke(main, ["spectrum", str(ckpt), "-k", "2",
                                       "-o", str(tmp_path / "spectra.h5")])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line == f"error: {tmp_path / 'spectra.h5'}: disk quota exceeded (EDQUOT)"
