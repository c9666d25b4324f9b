"""Scoring: load a model folder, score feature batches with onnxruntime, turn scores into billing decisions.

A model folder holds ``model.onnx`` (input ``features`` float32 [N, F], output ``score`` float32 [N]),
``calibration.json`` (slice thresholds) and ``manifest.json`` (version, feature-spec hash, file hashes); see
docs/design.md. A model whose feature spec differs from ``stream.features`` is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from schemas.events import Decision, slice_of
from stream.features import COMBO_SHARDS, FEATURE_GROUPS, FEATURE_NAMES, FEATURE_SPEC_HASH

log = logging.getLogger(__name__)
INPUT_NAME = "features"
OUTPUT_NAME = "score"
EXPLAINER_FILE = "explain.onnx"


class ModelError(RuntimeError):
    """A model folder that cannot be used (missing files, wrong feature spec, bad hash)."""


@dataclass
class Model:
    version: str
    folder: Path
    session: Any  # onnxruntime.InferenceSession
    provider: str  # the execution provider actually in use
    default_threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    # reason codes: the raw feature vector of a typical human click, overall (``reference``) and per slice
    # (``slice_references``), from the manifest's ``reason_reference``; None for a model without one (its invalid
    # decisions name no feature groups)
    reference: np.ndarray | None = None
    slice_references: dict[str, np.ndarray] = field(default_factory=dict)
    # the reason codes' occlusion network: an ensemble's member 0 alone (``explain.onnx``, the manifest's
    # ``explainer``), or None: the served graph itself
    explainer: Any = None

    def threshold(self, slice_: str) -> float:
        return self.thresholds.get(slice_, self.default_threshold)


VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_version(v: object, what: str) -> str:
    """A model version is a plain name (it becomes a folder name): letters, digits, ``._+-``, no ``..``."""
    if not isinstance(v, str) or not VERSION_RE.fullmatch(v) or ".." in v:
        raise ModelError(f"{what} is not a plain version name: {str(v)[:80]!r}")
    return v


def active_model_dir(registry_path: Path) -> Path:
    """The folder of the registry's active model (``ACTIVE`` names the version)."""
    active = registry_path / "ACTIVE"
    if not active.exists():
        raise ModelError(f"no active model: {active} does not exist (train and activate one first)")
    return registry_path / check_version(active.read_text().strip(), f"{active}")


# Execution providers that live in a shared library of their own, loaded (with its CUDA/TensorRT dependencies)
# when a session asks for them: onnxruntime-gpu lists them as available even where those libraries are missing,
# then prints an error banner per provider and falls back to CPU.
_PROVIDER_LIBS = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
                  "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}


def _cannot_load(provider: str) -> str | None:
    """Why ``provider`` cannot load on this machine (a short reason), or None when it can."""
    import ctypes
    import os

    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return "not in this onnxruntime build"
    lib = _PROVIDER_LIBS.get(provider)
    if lib is None:
        return None
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    try:
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, lib))
    except OSError as e:  # e.g. "libcublasLt.so.13: cannot open shared object file: No such file or directory"
        return str(e).split(": cannot open")[0].rpartition("/")[2] + " not found"
    return None


def _providers(wanted: str | Sequence[str]) -> tuple[list[str], str]:
    """The asked providers that can load, in order (CPU last when not asked for), and why the first is used."""
    names = [p.strip() for p in wanted.split(",") if p.strip()] if isinstance(wanted, str) else list(wanted)
    chosen: list[str] = []
    skipped: list[str] = []
    for p in names:
        why = _cannot_load(p)
        if why is None:
            chosen.append(p)
        else:
            skipped.append(f"{p} skipped: {why}")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    reason = "; ".join(skipped) if skipped and chosen[0] == "CPUExecutionProvider" else \
        ("first asked provider that loads" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return chosen, reason


def load_model(folder: Path, providers: str | Sequence[str] = "CPUExecutionProvider", *,
               threads: int = 1) -> Model:
    """Load and check a model folder; refuse a feature-spec mismatch. ``threads``: onnxruntime intra-op."""
    import onnxruntime as ort

    folder = Path(folder)
    try:
        manifest = orjson.loads((folder / "manifest.json").read_bytes())
        calib = orjson.loads((folder / "calibration.json").read_bytes())
        onnx_bytes = (folder / "model.onnx").read_bytes()
    except FileNotFoundError as e:
        raise ModelError(f"incomplete model folder {folder}: {e.filename} missing") from None
    spec = manifest.get("feature_spec_hash")
    if spec != FEATURE_SPEC_HASH:
        shards = manifest.get("combo_shards")
        if shards is not None and shards != COMBO_SHARDS:  # (a manifest written before the setting names none)
            raise ModelError(
                f"model {folder} was trained with combo_shards={shards} but this process has {COMBO_SHARDS} "
                f"(SLIDR_COMBO_SHARDS): set the deployment's SLIDR_COMBO_SHARDS to {shards}, or retrain with "
                f"{COMBO_SHARDS}"
            )
        raise ModelError(
            f"model {folder} was trained on feature spec {spec!r} but this stream computes "
            f"{FEATURE_SPEC_HASH!r} ({len(FEATURE_NAMES)} features): retrain or deploy the matching code"
        )
    check_version(manifest.get("model_version"), f"model {folder}: manifest model_version")
    digests = manifest.get("sha256") or {}
    files = [("model.onnx", onnx_bytes), ("calibration.json", (folder / "calibration.json").read_bytes())]
    explainer = manifest.get("explainer")
    explainer_bytes = None
    if explainer is not None:
        name = explainer.get("file") if isinstance(explainer, dict) else None
        if name != EXPLAINER_FILE:
            raise ModelError(f"model {folder}: its manifest's explainer is not {{'file': {EXPLAINER_FILE!r}, ...}}")
        try:
            explainer_bytes = (folder / name).read_bytes()
        except FileNotFoundError:
            raise ModelError(f"incomplete model folder {folder}: {name} missing") from None
        files.append((name, explainer_bytes))
    for name, raw in files:
        want = digests.get(name)
        if not want:
            raise ModelError(f"model {folder}: its manifest lists no sha256 for {name}: refusing an unverified file")
        if hashlib.sha256(raw).hexdigest() != want:
            raise ModelError(f"model {folder}: {name} does not match the sha256 in its manifest")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # small batches: one thread beats thread-pool wake-ups
    opts.inter_op_num_threads = 1
    chosen, why = _providers(providers)
    sess = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=chosen)
    explain = (ort.InferenceSession(explainer_bytes, sess_options=opts, providers=chosen)
               if explainer_bytes is not None else None)
    active = sess.get_providers()[0]  # what runs, whatever was asked for
    if active != chosen[0]:
        why = f"{chosen[0]} failed to initialise (see onnxruntime's messages above)"
    log.info("model %s scores on %s: %s", manifest.get("model_version"), active, why)
    reference, slice_refs = _references(manifest.get("reason_reference"), folder)
    return Model(
        version=str(manifest.get("model_version") or folder.name),
        folder=folder,
        session=sess,
        provider=active,
        default_threshold=float(calib.get("default_threshold", 0.5)),
        thresholds={k: float(v) for k, v in (calib.get("thresholds") or {}).items()},
        manifest=manifest,
        reference=reference,
        slice_references=slice_refs,
        explainer=explain,
    )


def _references(raw: Any, folder: Path) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """The manifest's ``reason_reference``: ``{"all": [F numbers], "slices": {slice: [F numbers]}}`` (or absent)."""
    if raw is None:
        return None, {}

    def vec(v: Any, what: str) -> np.ndarray:
        try:
            a = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError):
            a = np.zeros(0, dtype=np.float32)
        if a.shape != (len(FEATURE_NAMES),) or not np.isfinite(a).all():
            raise ModelError(f"model {folder}: reason_reference {what} is not {len(FEATURE_NAMES)} finite numbers")
        return a

    if not isinstance(raw, dict) or not isinstance(raw.get("slices", {}), dict):
        raise ModelError(f"model {folder}: reason_reference is not {{'all': [...], 'slices': {{...}}}}")
    return vec(raw.get("all"), "all"), {str(k): vec(v, str(k)) for k, v in raw.get("slices", {}).items()}


def score_batch(model: Model, matrix: np.ndarray) -> np.ndarray:
    """P(robot) for each row of a raw feature matrix ``[N, F]`` (float32)."""
    return _run(model.session, matrix)


def _run(session: Any, matrix: np.ndarray) -> np.ndarray:
    """One ONNX call of a scoring graph (the model or its explainer) over a raw feature matrix ``[N, F]``."""
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"expected a [N, {len(FEATURE_NAMES)}] matrix, got {x.shape}")
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return np.asarray(out, dtype=np.float32).reshape(-1)


# Reason codes: each feature group occluded (its features set to the reference values of the click's slice: a
# typical human click of that slice) in one extra ONNX call over the invalid clicks; a group's push is the score
# it adds over that reference. For an ensemble that call runs its member 0 alone (``Model.explainer``), on the
# clicks as they are and occluded: the pushes are that member's, at a fifth of the cost with five members. Pushes
# are rounded before ranking so that float noise between batch compositions never reorders near-ties. The slice
# group (logged-in, platform) is the context a click is judged in (its threshold is the slice's own), never a
# reason: it is not occluded.
_EXPLAINED = tuple((g, names) for g, names in FEATURE_GROUPS if g != "slice")
_GROUP_MASK = np.zeros((len(_EXPLAINED), len(FEATURE_NAMES)), dtype=bool)
for _g, (_, _names) in enumerate(_EXPLAINED):
    _GROUP_MASK[_g, [FEATURE_NAMES.index(n) for n in _names]] = True
GROUP_NAMES = tuple(g for g, _ in _EXPLAINED)
REASON_GROUPS = 3  # groups named per invalid decision, at most
_PUSH_MIN = 1e-3  # a group that moves the score by less is not named


def reason_groups(model: Model, matrix: np.ndarray, scores: np.ndarray, rows: Sequence[int],
                  slices: Sequence[str]) -> list[list[str]]:
    """For each row index in ``rows`` (of the slice at the same place in ``slices``): up to ``REASON_GROUPS``
    feature groups whose values pushed its score up most against the reference click of its slice, largest push
    first (empty lists without a reference)."""
    if model.reference is None or not len(rows):
        return [[] for _ in rows]
    x = np.asarray(matrix, dtype=np.float32)[list(rows)]  # [k, F]
    ref = np.stack([model.slice_references.get(sl, model.reference) for sl in slices])  # [k, F]
    occluded = np.where(_GROUP_MASK[None, :, :], ref[:, None, :], x[:, None, :])  # [k, G, F]
    k, g = len(x), len(GROUP_NAMES)
    if model.explainer is not None:  # its own score of the clicks as they are, in the same call
        out = _run(model.explainer, np.concatenate([x, occluded.reshape(k * g, -1)]))
        own, s_occ = out[:k], out[k:].reshape(k, g)
    else:
        own = np.asarray(scores, dtype=np.float32)[list(rows)]
        s_occ = score_batch(model, occluded.reshape(k * g, -1)).reshape(k, g)
    push = np.round(own[:, None] - s_occ, 4)
    order = np.argsort(-push, axis=1, kind="stable")[:, :REASON_GROUPS]
    return [[GROUP_NAMES[j] for j in order[i] if push[i, j] >= _PUSH_MIN] for i in range(k)]


def decision_dicts(model: Model, clicks: Sequence[Any], scores: np.ndarray, *, decided_at: int, revision: int = 0,
                   replay_id: str | None = None, degraded: bool = False,
                   features: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One decision per click as a dict in ``Decision``'s field order (``orjson.dumps`` of it is the wire record,
    byte for byte ``Decision.to_json()``): invalid when ``score >= threshold`` of the click's slice. The worker's
    hot path builds these instead of models: the values are ours and in range, and tests check that they pass
    the strict schema. With ``features`` (the scored matrix) and a model that has a reference, an invalid
    decision's reason ends with the feature groups that pushed its score most (``reason_groups``)."""
    out: list[dict[str, Any]] = []
    version = model.version
    invalid: list[int] = []
    invalid_slices: list[str] = []
    for i, (c, s) in enumerate(zip(clicks, scores.tolist(), strict=True)):
        sl = slice_of(c.platform, c.logged_in)
        thr = model.threshold(sl)
        score = min(max(s, 0.0), 1.0) if s == s else 1.0  # a NaN score is treated as certain robot
        valid = score < thr
        if not valid:
            invalid.append(i)
            invalid_slices.append(sl)
        out.append({
            "v": 1, "click_id": c.click_id, "valid": valid, "score": score, "threshold": thr, "slice": sl,
            "model_version": version, "revision": revision, "replay_id": replay_id, "decided_at": decided_at,
            "reason": "" if valid else f"score {score:.3f} >= {thr:.3f} on {sl}",
            "event_ts": c.ts, "advertiser_id": c.advertiser_id, "cpc": c.cpc, "degraded": degraded,
        })
    if features is not None and invalid and model.reference is not None:
        reasons = reason_groups(model, features, scores, invalid, invalid_slices)
        for i, groups in zip(invalid, reasons, strict=True):
            if groups:
                out[i]["reason"] += "; pushed by " + ", ".join(groups)
    return out


def decide(model: Model, clicks: Sequence[Any], scores: np.ndarray, *, decided_at: int, revision: int = 0,
           replay_id: str | None = None, degraded: bool = False,
           features: np.ndarray | None = None) -> list[Decision]:
    """One Decision per click: invalid when ``score >= threshold`` of the click's slice."""
    return [Decision.model_construct(**d) for d in decision_dicts(
        model, clicks, scores, decided_at=decided_at, revision=revision, replay_id=replay_id, degraded=degraded,
        features=features)]
