"""MLP training wall time: ``slidr bench train [--set rows=1000000] [--set data=DIR]``.

Trains the production MLP (models/config.py defaults) for a fixed number of epochs (no early stopping, so
the figure is per epoch of work) on ``rows`` rows: the features of the dataset folder ``data`` tiled to
``rows`` when given, else random raw-feature-shaped rows with random labels. CPU unless torch sees a GPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


def run(rows: int = 1_000_000, epochs: int = 3, data: str | None = None, threads: int = 0,
        batch_size: int = 1024) -> dict[str, Any]:
    import torch

    from models.config import TrainConfig
    from models.labels import TRAIN, VAL
    from models.train import TrainingData, train
    from stream.features import N_FEATURES

    rng = np.random.default_rng(0)
    if data:
        from pathlib import Path

        from models.pipeline import load_training_data

        src = load_training_data(Path(data), TrainConfig())
        idx = rng.integers(0, len(src.x), rows)
        x, label = src.x[idx], src.label[idx]
    else:
        x = np.abs(rng.normal(0, 1, (rows, N_FEATURES)) * rng.choice([1.0, 30.0], N_FEATURES)).astype(np.float32)
        label = (rng.random(rows) < 0.5).astype(np.int8)
    n_val = max(rows // 10, 1)
    split = np.full(rows, TRAIN, dtype=np.int8)
    split[-n_val:] = VAL
    ts = np.arange(rows, dtype=np.int64) * 1000
    td = TrainingData(x=x, label=label, purchased=label == 0, heavy=np.zeros(rows, dtype=bool),
                      slices=np.full(rows, "desktop:in"), logged_in=rng.random(rows) < 0.5, ts=ts,
                      hour=rng.integers(0, 24, rows), dow=rng.integers(0, 7, rows), split=split,
                      usable=np.ones(rows, dtype=bool))
    cfg = TrainConfig(epochs=epochs, patience=epochs + 1, progress=False, threads=threads,
                      batch_size=batch_size)
    t0 = time.perf_counter()
    _, hist = train(td, cfg, "mlp")
    wall = time.perf_counter() - t0
    n_train = hist["train_rows"]
    return {
        "rows": rows,
        "train_rows": n_train,
        "epochs": len(hist["epochs"]),
        "hidden": list(cfg.hidden),
        "batch_size": batch_size,
        "wall_s": round(wall, 2),
        "s_per_epoch": round(hist["train_seconds"] / max(len(hist["epochs"]), 1), 2),
        "train_rows_per_s": round(n_train * len(hist["epochs"]) / hist["train_seconds"]),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cpu",
        "data": data or "random",
    }
