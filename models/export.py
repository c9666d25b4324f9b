"""ONNX export (input ``features`` float32 [N, F], output ``score`` float32 [N]) and onnxruntime scoring."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

OPSET = 17  # supported by every onnxruntime >= 1.14


def export_onnx(model: Any, n_features: int, path: Path) -> Path:
    """Write ``model`` (a models.nets.Scorer) as ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``): the graphs are tiny and static, and it needs
    no onnxscript at run time.
    """
    import torch

    model.eval()
    dummy = torch.zeros(2, n_features, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model, (dummy,), str(path),
            input_names=["features"], output_names=["score"],
            dynamic_axes={"features": {0: "N"}, "score": {0: "N"}},
            opset_version=OPSET, dynamo=False,
        )
    return path


def session(path: Path, providers: list[str] | None = None) -> Any:
    """An onnxruntime session on the available providers (CPU here; check ``get_providers()``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    avail = ort.get_available_providers()
    want = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=want)


def score_onnx(path_or_session: Any, x: npt.NDArray[np.float32], batch: int = 65536) -> npt.NDArray[np.float32]:
    """P(robot) for every row with onnxruntime."""
    sess = session(Path(path_or_session)) if isinstance(path_or_session, (str, Path)) else path_or_session
    out = [sess.run(["score"], {"features": np.ascontiguousarray(x[i:i + batch], dtype=np.float32)})[0]
           for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
