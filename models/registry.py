"""Model registry: model folders under ``settings.registry_path/<version>/``, two pointer files, one history.

- ``ACTIVE``: the version the stream scores with (the one file the workers watch).
- ``STABLE``: the last known-good version; ``rollback()`` makes it active again.
- ``history.jsonl``: one JSON line per change (register, promote, rollback, mark_stable, refuse), append-only.

A version's state follows from these: ``active`` (ACTIVE names it), ``stable`` (STABLE names it; a version can be
both), ``retired`` (was active once, is neither now), ``candidate`` (registered, never active). Pointer files are
replaced atomically (write a temp file, rename), so a reader never sees half a name; a history line is one
``write()`` on an ``O_APPEND`` descriptor, so two processes appending never interleave.

``promote`` loads the model as the stream does (``stream.scoring.load_model``: sha256 of model.onnx and
calibration.json, feature-spec hash, plain version) and checks every other listed file: a tampered, truncated or
mismatched model is refused with an error naming the file, and ACTIVE is left as it was.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from slidr.settings import Settings, get_settings

ACTIVE = "ACTIVE"
STABLE = "STABLE"
MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
LOADABLE = (".onnx", ".json")  # the only kinds of file a model folder may list (no pickle, ever)
STATES = ("candidate", "active", "stable", "retired")


class RegistryError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model_dir: Path) -> dict[str, Any]:
    """Load a model folder's manifest and check every listed file's sha256; return the manifest."""
    mf = model_dir / MANIFEST
    if not mf.exists():
        raise RegistryError(f"{model_dir}: no {MANIFEST}")
    try:
        manifest = orjson.loads(mf.read_bytes())
    except orjson.JSONDecodeError as e:
        raise RegistryError(f"{model_dir}: {MANIFEST} is not valid JSON ({e})") from None
    for name, digest in manifest.get("sha256", {}).items():
        if Path(name).name != name or not name.endswith(LOADABLE):
            raise RegistryError(f"{model_dir}: the manifest lists {name!r}: only .onnx and .json files are loaded")
        p = model_dir / name
        if not p.exists():
            raise RegistryError(f"{model_dir}: {name} is listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise RegistryError(f"{model_dir}: {name} does not match its sha256 in the manifest")
    return dict(manifest)


def verify_loadable(model_dir: Path) -> dict[str, Any]:
    """Everything ``verify`` checks, plus what the worker checks when it loads the model (``load_model``: model.onnx
    and calibration.json listed and intact, feature-spec hash, onnxruntime parses the graph) and that the folder is
    named after its version. Returns the manifest; raises RegistryError naming the file."""
    from stream.scoring import ModelError, load_model

    manifest = verify(model_dir)
    try:
        load_model(model_dir)
    except ModelError as e:
        raise RegistryError(str(e)) from None
    except Exception as e:  # onnxruntime refusing the graph (a truncated file whose digest was rewritten)
        raise RegistryError(f"model {model_dir}: model.onnx does not load: {str(e).splitlines()[0][:200]}") from None
    if manifest.get("model_version") != model_dir.name:
        raise RegistryError(f"{model_dir}: manifest model_version {manifest.get('model_version')!r} is not the "
                            "folder's version")
    return manifest


def check_version(v: object, what: str = "model version") -> str:
    """Versions become folder names: a plain name only (``stream.scoring.check_version``), else RegistryError."""
    from stream.scoring import ModelError
    from stream.scoring import check_version as check

    try:
        return check(v, what)
    except ModelError as e:
        raise RegistryError(str(e)) from None


def _root(settings: Settings | None) -> Path:
    return (settings or get_settings()).registry_path


def _write_pointer(path: Path, version: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share a temp file
    tmp.write_text(version + "\n")
    os.replace(tmp, path)


def _read_pointer(path: Path) -> str | None:
    v = path.read_text().strip() or None if path.exists() else None
    return None if v is None else check_version(v, str(path))


# ---- history ---------------------------------------------------------------------------------------------------
def record(settings: Settings | None, action: str, frm: str | None, to: str | None, reason: str = "",
           **extra: Any) -> dict[str, Any]:
    """Append one line to the history: ``{"time", "ts_ms", "action", "from", "to", "reason", "by", ...}``."""
    root = _root(settings)
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    entry = {"time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), "ts_ms": int(now * 1000),
             "action": action, "from": frm, "to": to, "reason": reason, "by": _who(), **extra}
    line = orjson.dumps(entry) + b"\n"
    fd = os.open(root / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of the whole line: appends from two processes never interleave
    finally:
        os.close(fd)
    return entry


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def history(settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every history entry, oldest first (a torn last line, from a crash mid-write, is skipped)."""
    f = _root(settings) / HISTORY
    if not f.exists():
        return []
    out = []
    for line in f.read_bytes().splitlines():
        try:
            out.append(dict(orjson.loads(line)))
        except orjson.JSONDecodeError:
            continue
    return out


# ---- publishing and pointers -----------------------------------------------------------------------------------
def register(model_dir: Path, settings: Settings | None = None, *, reason: str = "") -> str:
    """Copy a verified model folder into the registry as a candidate (ACTIVE and STABLE untouched)."""
    manifest = verify(Path(model_dir))
    version = check_version(manifest.get("model_version"), f"{model_dir}: manifest model_version")
    root = _root(settings)
    dest = root / version
    root.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        published = verify(dest)  # same version already published: must be intact, and the same model
        if published.get("sha256") != manifest.get("sha256"):
            raise RegistryError(f"version {version} is already in the registry with other files (a recalibrated "
                                f"model gets a version of its own: slidr calibrate gives it one)")
        return version
    tmp = root / f".{version}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    os.replace(tmp, dest)
    record(settings, "register", None, version, reason)
    return version


def publish(model_dir: Path, settings: Settings | None = None, *, activate: bool = True,
            stable: bool = False) -> str:
    """Register a model folder under its manifest's ``model_version``.

    ``activate`` points ACTIVE at it; ``stable`` (or no STABLE yet) points STABLE at it too.
    """
    version = register(model_dir, settings)
    root = _root(settings)
    if activate:
        before = active_version(settings)
        _write_pointer(root / ACTIVE, version)
        if before != version:
            record(settings, "promote", before, version, "published")
    if stable or _read_pointer(root / STABLE) is None:
        before = stable_version(settings)
        _write_pointer(root / STABLE, version)
        if before != version:
            record(settings, "mark_stable", before, version, "published")
    return version


def promote(version: str, settings: Settings | None = None, *, reason: str = "") -> str:
    """Make a registered version active after checking it as the worker will load it (``verify_loadable``); with
    no STABLE yet it becomes stable too. A refused version leaves ACTIVE as it was; the refusal is recorded in the
    history. Returns the version.
    """
    v = check_version(version)
    d = _root(settings) / v
    if not d.is_dir():
        raise RegistryError(f"cannot promote {v!r}: not in the registry {_root(settings)}")
    before = active_version(settings)
    try:
        verify_loadable(d)
    except RegistryError as e:
        record(settings, "refuse", before, v, str(e))
        raise
    _write_pointer(_root(settings) / ACTIVE, v)
    record(settings, "promote", before, v, reason)
    if stable_version(settings) is None:  # the first model is the stable one, as with publish
        mark_stable(v, settings, reason="first active model")
    return v


def versions(settings: Settings | None = None) -> list[str]:
    root = _root(settings)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.exists() else []


def active_version(settings: Settings | None = None) -> str | None:
    return _read_pointer(_root(settings) / ACTIVE)


def stable_version(settings: Settings | None = None) -> str | None:
    return _read_pointer(_root(settings) / STABLE)


def active_model_dir(settings: Settings | None = None) -> Path:
    """The folder of the ACTIVE version (raises RegistryError when there is none)."""
    v = active_version(settings)
    if v is None:
        raise RegistryError(f"no ACTIVE model in {_root(settings)}: publish one first")
    d = _root(settings) / v
    if not d.is_dir():
        raise RegistryError(f"ACTIVE names {v!r} but {d} does not exist")
    return d


def mark_stable(version: str | None = None, settings: Settings | None = None, *, reason: str = "") -> str:
    """Point STABLE at ``version`` (default: the active one), e.g. after it served well."""
    v = version or active_version(settings)
    if v is not None:
        check_version(v)
    if v is None or not (_root(settings) / v).is_dir():
        raise RegistryError(f"cannot mark {v!r} stable: not in the registry")
    before = stable_version(settings)
    _write_pointer(_root(settings) / STABLE, v)
    if before != v:
        record(settings, "mark_stable", before, v, reason)
    return v


def rollback(settings: Settings | None = None, *, reason: str = "") -> str:
    """Make the STABLE version active again (its files checked first); returns it."""
    v = stable_version(settings)
    if v is None or not (_root(settings) / v).is_dir():
        raise RegistryError("no STABLE model to roll back to")
    verify(_root(settings) / v)
    before = active_version(settings)
    _write_pointer(_root(settings) / ACTIVE, v)
    record(settings, "rollback", before, v, reason)
    return v


# ---- states ----------------------------------------------------------------------------------------------------
def states(settings: Settings | None = None) -> dict[str, list[str]]:
    """Each registered version's states: ``active`` and/or ``stable``, else ``retired`` or ``candidate``."""
    act, stab = active_version(settings), stable_version(settings)
    was_active = {e.get("to") for e in history(settings) if e.get("action") in ("promote", "rollback")}
    was_active.add(act)
    out: dict[str, list[str]] = {}
    for v in versions(settings):
        st = [s for s, on in (("active", v == act), ("stable", v == stab)) if on]
        out[v] = st or (["retired"] if v in was_active else ["candidate"])
    return out


def describe(version: str, settings: Settings | None = None) -> dict[str, Any]:
    """A version's manifest summary, its states and its history entries (``slidr models show``)."""
    v = check_version(version)
    d = _root(settings) / v
    if not d.is_dir():
        raise RegistryError(f"{v!r} is not in the registry {_root(settings)}")
    m = orjson.loads((d / MANIFEST).read_bytes()) if (d / MANIFEST).exists() else {}
    keep = ("model_version", "trained_version", "kind", "feature_spec_hash", "combo_shards", "created_at",
            "training_window", "data_dir", "metrics", "calibration", "sha256", "retrain")
    return {"version": v, "folder": str(d), "states": states(settings).get(v, []),
            "manifest": {k: m[k] for k in keep if k in m},
            "history": [e for e in history(settings) if v in (e.get("from"), e.get("to"))]}
