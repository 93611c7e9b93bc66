"""Rebuild the sample checkpoints in sample_checkpoints/ deterministically.

Each sample is trained from `subspace init`-style initial weights with plain mini-batch SGD
under the paper's protocol (MSE loss, batch 50), single-threaded so that the bytes are the
same on every machine of the same architecture. Usage:

    python scripts/make_samples.py            # all samples
    python scripts/make_samples.py mlp_mnist1d
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from subspace_cli.checkpoint import ExperimentSpec, write_checkpoint
from subspace_cli.experiment import build_data, build_model, complete_model_config
from subspace_cli.losses import loss_sum
from subspace_cli.training import evaluate

OUT = Path(__file__).resolve().parents[1] / "sample_checkpoints"


@dataclass
class Sample:
    name: str
    model: str
    data: str
    model_config: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    loss: str = "mse"
    lr: float = 0.01
    batch_size: int = 50
    steps: int = 5000
    seed: int = 0


SAMPLES = [
    # The paper's fc-tanh (784->200->200->10 on MNIST-5k) with MNIST-1D-5k standing in.
    Sample(
        "mlp_mnist1d",
        "mlp",
        "mnist1d",
        {"widths": [200, 200], "activation": "tanh"},
        {"n_train": 5000, "seed": 42},
        lr=0.01,
        steps=20000,
    ),
    # The paper's cnn-relu, on scikit-learn's 8x8 digits (1,797 images).
    Sample(
        "cnn_digits", "cnn", "digits", {"channels": 32}, {"shape": "image"}, lr=0.01, steps=3000
    ),
    # The paper's ResNet-8 (He et al.'s CIFAR ResNet, BatchNorm, width 16) on the 8x8 digits:
    # trained in train mode, so its BatchNorm running statistics are those of real training.
    Sample(
        "resnet_digits", "resnet", "digits", {"depth": 8, "width": 16}, {"shape": "image"},
        lr=0.05, steps=2000,
    ),
    # The paper's 2-layer transformer (width 64, 8 heads), on MNIST-1D read as 40 scalar tokens.
    Sample(
        "transformer_mnist1d",
        "transformer",
        "mnist1d",
        {},
        {"n_train": 1000, "seed": 42},
        lr=0.01,
        steps=3000,
    ),
]


def train(sample: Sample) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = build_data(sample.data, sample.data_config, from_user=True)
    config = complete_model_config(sample.model, sample.model_config, data, from_user=True)
    torch.manual_seed(sample.seed)
    model = build_model(sample.model, config, from_user=True)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=sample.lr)
    generator = torch.Generator().manual_seed(sample.seed)
    start = evaluate(model, data, sample.loss)
    began = time.perf_counter()
    n = len(data)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for _ in range(sample.steps):
        if cursor + sample.batch_size > n:  # a new epoch: reshuffle
            order, cursor = torch.randperm(n, generator=generator), 0
        x, y = data.take(order[cursor : cursor + sample.batch_size])
        cursor += sample.batch_size
        optimizer.zero_grad()
        (loss_sum(sample.loss, model(x), y) / len(y)).backward()
        optimizer.step()
    final = evaluate(model, data, sample.loss)
    spec = ExperimentSpec(sample.model, config, sample.data, sample.data_config, sample.loss)
    recipe = {
        "optimizer": "sgd",
        "lr": sample.lr,
        "batch_size": sample.batch_size,
        "steps": sample.steps,
        "seed": sample.seed,
        "script": "scripts/make_samples.py",
    }
    metadata = spec.to_metadata(step=sample.steps)
    metadata["subspace.seed"] = str(sample.seed)
    metadata["subspace.train"] = json.dumps(recipe, sort_keys=True)
    metadata["subspace.train_loss"] = f"{final.loss:.6g}"
    metadata["subspace.train_accuracy"] = f"{final.accuracy:.4f}"
    path = write_checkpoint(
        OUT / f"{sample.name}.safetensors", model.state_dict(), metadata, overwrite=True
    )
    return {
        "sample": sample.name,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": n,
        "steps": sample.steps,
        "lr": sample.lr,
        "start_loss": start.loss,
        "final_loss": final.loss,
        "final_accuracy": final.accuracy,
        "seconds": round(time.perf_counter() - began, 1),
        "bytes": path.stat().st_size,
    }


def main(names: list[str]) -> None:
    chosen = [s for s in SAMPLES if not names or s.name in names]
    for sample in chosen:
        print(json.dumps(train(sample)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
