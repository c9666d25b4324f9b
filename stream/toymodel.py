"""A small hand-weighted logistic ONNX model in the registry's folder layout, for tests and benchmarks.

Not a trained model: it exists so the stream can be tested and measured before (and independently of) the
trainer. It needs the ``onnx`` package (training extra).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import orjson

from schemas.events import SLICES
from stream.features import COMBO_SHARDS, FEATURE_NAMES, FEATURE_SPEC_HASH

# weights on standardised raw features: fast, regular clickers on crowded IPs look robotic
_WEIGHTS = {"u_clicks_1m": 1.2, "u_clicks_5m": 0.8, "u_lgap_std": -0.6, "ip_users_1h": 0.5,
            "rfm_known": -0.7, "ip_datacenter": 1.5}
_SCALE = {"u_clicks_1m": 3.0, "u_clicks_5m": 8.0, "u_lgap_std": 1.0, "ip_users_1h": 10.0}
# reason codes' reference click (manifest ``reason_reference``): one click a minute, irregular, a quiet IP,
# a known customer on a residential address
_REFERENCE = {"u_clicks_1m": 1.0, "u_clicks_5m": 1.0, "u_lgap_std": 1.0, "ip_users_1h": 1.0, "rfm_known": 1.0}


def build(folder: Path, *, version: str = "toy-1", threshold: float = 0.7, bias: float = -2.0,
          feature_spec_hash: str = FEATURE_SPEC_HASH, combo_shards: int = COMBO_SHARDS, batch_dim: str = "N",
          reference: bool = True, slice_references: dict[str, dict[str, float]] | None = None) -> Path:
    """Write model.onnx + calibration.json + manifest.json into ``folder``; return the folder. ``reference``:
    give the manifest a ``reason_reference`` (reason codes); ``slice_references``: per slice, the features whose
    reference differs from the overall one there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f = len(FEATURE_NAMES)
    w = np.zeros((f, 1), dtype=np.float32)
    scale = np.ones(f, dtype=np.float32)
    for name, v in _WEIGHTS.items():
        w[FEATURE_NAMES.index(name), 0] = v
    for name, v in _SCALE.items():
        scale[FEATURE_NAMES.index(name)] = 1.0 / v
    nodes = [
        helper.make_node("Mul", ["features", "scale"], ["xs"]),  # normalisation lives in the graph
        helper.make_node("MatMul", ["xs", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "toy_logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch_dim, f])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch_dim])],
        initializer=[numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([bias], dtype=np.float32), "b"),
                     numpy_helper.from_array(np.array([-1], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    raw = model.SerializeToString()
    (folder / "model.onnx").write_bytes(raw)
    calib = {"method": "slice", "default_threshold": threshold,
             "thresholds": {s: threshold for s in SLICES}, "fpr_budget": 0.01}
    cal_raw = orjson.dumps(calib)
    (folder / "calibration.json").write_bytes(cal_raw)
    manifest = {"model_version": version, "kind": "toy-logistic", "feature_spec_hash": feature_spec_hash,
                "combo_shards": combo_shards, "feature_names": list(FEATURE_NAMES),
                "created_at": int(time.time() * 1000), "training_window": None, "metrics": {},
                "config": {"weights": _WEIGHTS},
                "sha256": {"model.onnx": hashlib.sha256(raw).hexdigest(),
                           "calibration.json": hashlib.sha256(cal_raw).hexdigest()}}
    if reference:
        manifest["reason_reference"] = {
            "all": [_REFERENCE.get(n, 0.0) for n in FEATURE_NAMES],
            "slices": {sl: [{**_REFERENCE, **over}.get(n, 0.0) for n in FEATURE_NAMES]
                       for sl, over in (slice_references or {}).items()}}
    (folder / "manifest.json").write_bytes(orjson.dumps(manifest))
    return folder


def build_registry(registry: Path, version: str = "toy-1", **kw: object) -> Path:
    """A registry folder with one toy model marked ACTIVE and STABLE."""
    build(registry / version, version=version, **kw)  # type: ignore[arg-type]
    (registry / "ACTIVE").write_text(version)
    (registry / "STABLE").write_text(version)
    return registry / version
