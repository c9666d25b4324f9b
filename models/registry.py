"""Minimal model registry: model folders under ``settings.registry_path/<version>/`` and two pointer files.

- ``ACTIVE``: the version the stream should score with.
- ``STABLE``: the last known-good version; ``rollback()`` makes it active again.

Pointer files are replaced atomically (write a temp file, rename), so a reader never sees half a name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import orjson

from slidr.settings import Settings, get_settings

ACTIVE = "ACTIVE"
STABLE = "STABLE"
MANIFEST = "manifest.json"


class RegistryError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model_dir: Path) -> dict[str, object]:
    """Load a model folder's manifest and check every listed file's sha256; return the manifest."""
    mf = model_dir / MANIFEST
    if not mf.exists():
        raise RegistryError(f"{model_dir}: no {MANIFEST}")
    manifest = orjson.loads(mf.read_bytes())
    for name, digest in manifest.get("sha256", {}).items():
        p = model_dir / name
        if not p.exists():
            raise RegistryError(f"{model_dir}: {name} is listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise RegistryError(f"{model_dir}: {name} does not match its sha256 in the manifest")
    return dict(manifest)


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(version + "\n")
    os.replace(tmp, path)


def _read_pointer(path: Path) -> str | None:
    v = path.read_text().strip() or None if path.exists() else None
    return None if v is None else check_version(v, str(path))


def publish(model_dir: Path, settings: Settings | None = None, *, activate: bool = True,
            stable: bool = False) -> str:
    """Copy a verified model folder into the registry under its manifest's ``model_version``.

    ``activate`` points ACTIVE at it; ``stable`` (or no STABLE yet) points STABLE at it too.
    """
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
    else:
        tmp = root / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        os.replace(tmp, dest)
    if activate:
        _write_pointer(root / ACTIVE, version)
    if stable or _read_pointer(root / STABLE) is None:
        _write_pointer(root / STABLE, version)
    return version


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


def mark_stable(version: str | None = None, settings: Settings | None = None) -> str:
    """Point STABLE at ``version`` (default: the active one), e.g. after it served well."""
    v = version or active_version(settings)
    if v is not None:
        check_version(v)
    if v is None or not (_root(settings) / v).is_dir():
        raise RegistryError(f"cannot mark {v!r} stable: not in the registry")
    _write_pointer(_root(settings) / STABLE, v)
    return v


def rollback(settings: Settings | None = None) -> str:
    """Make the STABLE version active again; returns it."""
    v = stable_version(settings)
    if v is None or not (_root(settings) / v).is_dir():
        raise RegistryError("no STABLE model to roll back to")
    _write_pointer(_root(settings) / ACTIVE, v)
    return v
