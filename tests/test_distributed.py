"""Issue 16: data-parallel spectrum, align and project-train under torchrun (2 gloo processes on
localhost), against one process. The model takes named inputs and token labels and the 13
sequences split 6/7 between the ranks, so the means are weighted by tokens over unequal shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from plugin_fixtures import forget_fake_plugin, run_cli, write_fake_plugin
from safetensors.torch import load_file, save_file

from subspace_cli import runlog, store
from subspace_cli.eigensolver import subspace_overlap

pytest.importorskip("torch.distributed.run")

VOCAB, T, N = 12, 6, 13
TIMEOUT = 120  # seconds for one torchrun; a hang fails the test instead of stalling CI


def _tokens(path, poison_last=False):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB - 1, (N, T), generator=g) * mask  # never VOCAB - 1 ...
    if poison_last:
        ids[-1, 0] = VOCAB - 1  # ... except in the last sequence: rank 1's shard
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fake plugin (importable by the torchrun workers too) and a checkpoint of its
    token-level model on 13 padded sequences; the model refuses token VOCAB - 1."""
    root = tmp_path_factory.mktemp("dist")
    site = write_fake_plugin(root / "site")
    sys.path.insert(0, str(site))
    try:
        tokens = _tokens(root / "lm.safetensors")
        ckpt = root / "start.safetensors"
        config = json.dumps({"vocab": VOCAB, "width": 4, "token_level": True,
                             "poison": VOCAB - 1})
        result = run_cli("init", "--model", "masked", "--model-config", config, "--data",
                         "tokens", "--data-config", json.dumps({"path": tokens,
                                                                "num_classes": VOCAB}),
                         "--loss", "ce", "--seed", "2", "--output", str(ckpt))
        assert result.exit_code == 0, result.stderr
        yield {"root": root, "site": site, "ckpt": ckpt, "tokens": tokens}
    finally:
        sys.path.remove(str(site))
        forget_fake_plugin()


def _env(world):
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(world["site"]), os.environ.get("PYTHONPATH", "")])}


def _torchrun(world, *args, nproc=2):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m subspace_cli``."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), "-m", "subspace_cli", *args],
        capture_output=True, text=True, env=_env(world), timeout=TIMEOUT, cwd=world["root"])


def _spawn(world, *args, nproc=2):
    """The processes torchrun would start, started directly (the variables it sets, a free
    port on localhost): the same run without the launcher's start-up. Rank 0's output."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "subspace_cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=world["root"],
        env={**_env(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc)})
        for rank in range(nproc)]
    try:
        outputs = [proc.communicate(timeout=TIMEOUT) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:  # a hang fails the test and leaves no rank behind
            proc.kill()
            proc.communicate()
        raise
    assert [out for out, _ in outputs[1:]] == [""] * (nproc - 1)  # other ranks print nothing
    return subprocess.CompletedProcess(args, max(abs(p.returncode) for p in procs),
                                       outputs[0][0], "".join(err for _, err in outputs))


SOLVE = ["-k", "3", "--dtype", "float64", "--chunk-size", "2", "--hvp-method", "auto"]


def test_spectrum_and_align_match_one_process(world, tmp_path):
    ckpt = str(world["ckpt"])
    two = _torchrun(world, "spectrum", ckpt, *SOLVE, "--json", "-o", str(tmp_path / "2.h5"))
    assert two.returncode == 0, two.stderr
    [record] = json.loads(two.stdout)  # exactly one JSON document: rank 1 prints nothing
    one = run_cli("spectrum", ckpt, *SOLVE, "--json", "-o", str(tmp_path / "1.h5"))
    assert one.exit_code == 0, one.stderr
    [single] = json.loads(one.stdout)
    np.testing.assert_allclose(record["eigenvalues"], single["eigenvalues"], rtol=1e-6)
    assert record["n_samples"] == N
    [a] = store.iter_spectra(tmp_path / "2.h5")  # written once, by rank 0
    [b] = store.iter_spectra(tmp_path / "1.h5")
    overlap = subspace_overlap(torch.as_tensor(a.eigenvectors), torch.as_tensor(b.eigenvectors))
    assert overlap >= 0.99999
    align = ["align", ckpt, "-k", "3", "--eigenspace", str(tmp_path / "1.h5"), "--dtype",
             "float64", "--chunk-size", "2", "--batch-size", "5", "--batches", "2", "--json"]
    two = _spawn(world, *align)
    assert two.returncode == 0, two.stderr
    one = run_cli(*align)
    assert one.exit_code == 0, one.stderr
    [chi2], [chi1] = json.loads(two.stdout), json.loads(one.stdout)
    assert chi2["chi_full"] == pytest.approx(chi1["chi_full"], rel=1e-6)
    assert chi2["chi_minibatch"]["5"] == pytest.approx(chi1["chi_minibatch"]["5"], rel=1e-6)


def test_bulk_training_matches_one_process_and_resumes_only_with_two(world, tmp_path):
    ckpt = str(world["ckpt"])
    train = ["--mode", "bulk", "-k", "3", "--steps", "10", "--batch-size", "5", "--lr", "0.5",
             "--dtype", "float64", "--chunk-size", "2", "--log-every", "2", "--save-every", "5"]
    two = _spawn(world, "project-train", ckpt, *train, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    one = run_cli("project-train", ckpt, *train, "--out", str(tmp_path / "one"))
    assert one.exit_code == 0, one.stderr
    a, b = load_file(tmp_path / "two" / "last.safetensors"), load_file(
        tmp_path / "one" / "last.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-12)
    assert not torch.equal(a["embed.weight"],
                           load_file(world["ckpt"])["embed.weight"].double())  # it trained
    logged = runlog.read(tmp_path / "two" / "run.h5")["log"]["step"]
    assert list(logged) == [0, 2, 4, 6, 8]  # each row once: one writer
    torch.testing.assert_close(
        torch.as_tensor(runlog.read(tmp_path / "two" / "run.h5")["log"]["train_loss"]),
        torch.as_tensor(runlog.read(tmp_path / "one" / "run.h5")["log"]["train_loss"]),
        rtol=1e-9, atol=0)
    resumed = run_cli("project-train", "--resume", str(tmp_path / "two"), "--steps", "12")
    assert resumed.exit_code == 2
    assert "was trained by 2 data-parallel processes and this is one process" in resumed.stderr


def test_a_rank_failing_on_its_shard_ends_both_and_writes_nothing(world, tmp_path):
    poisoned = _tokens(tmp_path / "poisoned.safetensors", poison_last=True)
    out = tmp_path / "s.h5"
    # Started without torchrun, so no launcher kills the survivor: rank 0 must end by itself
    # (a hang fails the test at TIMEOUT).
    result = _spawn(world, "spectrum", str(world["ckpt"]), *SOLVE, "--data-config",
                    json.dumps({"path": poisoned, "num_classes": VOCAB}), "-o", str(out))
    assert result.returncode != 0
    assert "rank 1: " in result.stderr and "token 11 is poisoned" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    run = tmp_path / "run"
    result = _spawn(world, "project-train", str(world["ckpt"]), "--data-config",
                    json.dumps({"path": poisoned, "num_classes": VOCAB}), "--mode", "bulk",
                    "-k", "2", "--steps", "3", "--batch-size", "13", "--out", str(run))
    assert result.returncode != 0
    assert not run.exists()  # nothing to resume: no half-made run is left
