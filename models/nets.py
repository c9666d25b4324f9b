"""The scorers, all ``torch.nn.Module``s with one interface: raw features [N, F] float32 -> P(robot) [N].

Normalisation (log1p of count-like columns, then standardisation with training statistics) is part of each
learned model, so the exported ONNX graph takes the raw features the stream computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


class Normalizer(nn.Module):
    """x -> (maybe_log1p(x) - mean) / std, column-wise, with statistics fixed at training time."""

    def __init__(self, log_mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.log_mask: torch.Tensor
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.keep: torch.Tensor
        self.register_buffer("log_mask", log_mask.to(torch.bool))
        self.register_buffer("mean", mean.to(torch.float32))
        self.register_buffer("std", std.to(torch.float32))
        self.register_buffer("keep", (torch.ones_like(mean) if keep is None else keep).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(self.log_mask, torch.log(torch.clamp(x, min=0.0) + 1.0), x)
        return (x - self.mean) / self.std * self.keep  # dropped columns read as 0

    @staticmethod
    def fit(x: npt.NDArray[np.float32], drop: Sequence[int] = ()) -> Normalizer:
        """Count-like columns (never negative, some value > 1) get log1p; then mean/std of the result.

        Columns in ``drop`` are zeroed (the graph still takes every raw feature).
        """
        x64 = x.astype(np.float64)
        log_mask = (x64.min(axis=0) >= 0) & (x64.max(axis=0) > 1.0)
        z = np.where(log_mask, np.log1p(np.clip(x64, 0, None)), x64)
        mean, std = z.mean(axis=0), z.std(axis=0)
        std = np.where(std < 1e-6, 1.0, std)  # constant columns: leave them at 0 after centring
        keep = np.ones(x.shape[1])
        keep[list(drop)] = 0.0
        return Normalizer(torch.from_numpy(log_mask), torch.from_numpy(mean), torch.from_numpy(std),
                          torch.from_numpy(keep))


class Embeddings(nn.Module):
    """Hashed categories (``stream.features.CATEGORIES``) -> learned vectors, concatenated: column ``c`` of the raw
    features holds a bucket id in [0, n). Tables start at zero, so a bucket never seen in training (a user agent
    family or placement first met online) reads as "no information" rather than as noise; L2 keeps rare buckets
    near it."""

    def __init__(self, columns: Sequence[int], sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.columns = [int(c) for c in columns]
        self.sizes = [int(n) for n in sizes]
        tables = [nn.Embedding(n, dim) for n in self.sizes]
        for t in tables:
            nn.init.zeros_(t.weight)
        self.tables = nn.ModuleList(tables)
        self.dim = dim * len(self.columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(torch.clamp(x[:, c], 0.0, n - 1.0).long())
                          for c, n, t in zip(self.columns, self.sizes, self.tables, strict=True)], dim=-1)


class Scorer(nn.Module):
    """Common interface: ``logits(x)`` for training, ``forward(x)`` = sigmoid(logits) = P(robot), shape [N]."""

    kind = "scorer"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """Optimiser parameter groups (L2 where the model wants it)."""
        return [{"params": list(self.parameters()), "weight_decay": 0.0}]


class MLP(Scorer):
    """Three fully connected layers with ReLU; L2 (weight decay) on the two hidden layers' weights only."""

    kind = "mlp"

    def __init__(self, norm: Normalizer, n_features: int, hidden: Sequence[int] = (64, 32),
                 emb: Embeddings | None = None) -> None:
        super().__init__()
        h1, h2 = hidden
        self.norm = norm
        self.emb = emb
        self.fc1 = nn.Linear(n_features + (emb.dim if emb else 0), h1)
        self.fc2 = nn.Linear(h1, h2)
        self.out = nn.Linear(h2, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x) if self.emb is None else torch.cat([self.norm(x), self.emb(x)], dim=-1)
        h = torch.relu(self.fc1(z))
        h = torch.relu(self.fc2(h))
        return self.out(h).squeeze(-1)

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        decay = [self.fc1.weight, self.fc2.weight] + ([t.weight for t in self.emb.tables] if self.emb else [])
        rest = [p for p in self.parameters() if all(p is not d for d in decay)]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class DCN(Scorer):
    """A deep & cross network (DCN-v2, Wang et al. 2021, "parallel" form): ``cross`` full-rank cross layers
    x_{l+1} = x0 * (W_l x_l + b_l) + x_l beside the MLP's two ReLU layers, both on the normalised features,
    concatenated into one output unit. The cross layers model feature products (e.g. an IP's distinct users
    times its click rate) explicitly, which an MLP of this size has to approximate. L2 on every weight matrix
    except the output's, as the MLP."""

    kind = "dcn"

    def __init__(self, norm: Normalizer, n_features: int, hidden: Sequence[int] = (64, 32), cross: int = 2,
                 emb: Embeddings | None = None) -> None:
        super().__init__()
        h1, h2 = hidden
        d = n_features + (emb.dim if emb else 0)
        self.norm = norm
        self.emb = emb
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(cross))
        self.fc1 = nn.Linear(d, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.out = nn.Linear(h2 + d, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.norm(x) if self.emb is None else torch.cat([self.norm(x), self.emb(x)], dim=-1)
        xl = x0
        for layer in self.cross:
            xl = x0 * layer(xl) + xl
        h = torch.relu(self.fc2(torch.relu(self.fc1(x0))))
        return self.out(torch.cat([h, xl], dim=-1)).squeeze(-1)

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        decay = [self.fc1.weight, self.fc2.weight] + [c.weight for c in self.cross]
        decay += [t.weight for t in self.emb.tables] if self.emb else []
        rest = [p for p in self.parameters() if all(p is not d for d in decay)]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Ensemble(Scorer):
    """The mean of its members' logits: members of one kind trained alike from different seeds
    (``TrainConfig.ensemble``). One graph: exported, scored and explained like a single network."""

    def __init__(self, members: Sequence[Scorer]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.kind = members[0].kind

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([cast(Scorer, m).logits(x) for m in self.members]).mean(dim=0)


class LogReg(Scorer):
    """Logistic regression on the normalised features (one linear layer), trained like the MLP."""

    kind = "logreg"

    def __init__(self, norm: Normalizer, n_features: int) -> None:
        super().__init__()
        self.norm = norm
        self.lin = nn.Linear(n_features, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.norm(x)).squeeze(-1)

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        return [{"params": [self.lin.weight], "weight_decay": weight_decay},
                {"params": [self.lin.bias], "weight_decay": 0.0}]


class Heuristic(Scorer):
    """Click-velocity rule: max(c1m / (c1m + h1m), c1h / (c1h + h1h)) on the user's 1-min / 1-h counts."""

    kind = "heuristic"

    def __init__(self, idx_1m: int, idx_1h: int, half_1m: float = 5.0, half_1h: float = 60.0) -> None:
        super().__init__()
        self.idx_1m, self.idx_1h = idx_1m, idx_1h
        self.half_1m, self.half_1h = float(half_1m), float(half_1h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1m = torch.clamp(x[:, self.idx_1m], min=0.0)
        c1h = torch.clamp(x[:, self.idx_1h], min=0.0)
        return torch.maximum(c1m / (c1m + self.half_1m), c1h / (c1h + self.half_1h))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.clamp(self.forward(x), 1e-6, 1 - 1e-6)
        return torch.log(p / (1 - p))


@torch.no_grad()
def predict(model: nn.Module, x: npt.NDArray[np.float32], batch: int = 65536) -> npt.NDArray[np.float32]:
    """P(robot) for every row, in batches, on CPU."""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy()
           for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
