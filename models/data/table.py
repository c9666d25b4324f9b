"""Generic importer: a platform's own click logs (CSV, JSON lines, Parquet) into a dataset folder.

``slidr import table FILE... --map MAPPING [--purchases FILE... --purchases-map MAPPING] --out DIR``

A mapping says how each field of a :class:`~schemas.events.Click` (or ``Purchase``) is made from a row; it is
``key=value`` pairs (``--map click_id=id,ts=time,...``) or a TOML / JSON file of the same keys
(docs/design.md, "Table import mapping"). A field's value is

- a column name: ``ts = "event_time"``;
- a template with ``{column}`` placeholders (Python format syntax): ``session_id = "{ip}/{device}/{os}"``;
  ``{_row}`` is the 1-based data row number over all input files (``click_id = "td-{_row:06d}"``);
- a constant, written ``=value``: ``advertiser_id = "=acme"``, ``cpc = "=0.25"``.

Options in the same mapping: ``ts_format`` (``auto``, ``epoch_s``, ``epoch_ms``, ``iso`` or a strftime format;
times without a zone are UTC), ``ip_int_base`` (integer IP codes become ``base + code``, e.g. ``10.0.0.0``),
``platform_rule`` (``{"app": [values], "desktop": [values], "mobile": [values], "default": platform}``: the
platform column's raw values, compared as strings; without a rule the values must be ``desktop``/``mobile``/
``app``), and purchases found in the click rows: ``purchase_flag`` (column; rows where it is ``1``/``true``),
``purchase_ts``, ``purchase_id`` (default ``{_click_id}-p``), ``purchase_amount``. The slice follows: a click
is logged in (``:in``) exactly when ``customer_id`` maps to a non-empty value.

A row that cannot become a valid record (a missing column value, an unparseable time, a strict-schema error, a
duplicate click id, a purchase of an unknown click) is rejected, never dropped silently: every reject is written
to ``DIR/rejects.jsonl`` (``{"file", "row", "reason", "row_data"}``) and counted by reason in ``meta.json``
(``rejected``). Clicks are sorted by time with the row number breaking ties, purchases likewise.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from models.data.dataset import write_dataset, write_jsonl
from schemas.events import PLATFORMS, Click, Purchase

CLICK_FIELDS = ("click_id", "ts", "ip", "session_id", "customer_id", "user_agent", "platform", "ad_id",
                "campaign_id", "advertiser_id", "placement", "cpc", "tz_offset_min")
CLICK_REQUIRED = ("click_id", "ts", "ip", "session_id", "platform", "ad_id", "campaign_id", "advertiser_id")
PURCHASE_FIELDS = ("purchase_id", "click_id", "ts", "customer_id", "amount")
PURCHASE_REQUIRED = ("purchase_id", "click_id", "ts")
OPTIONS = ("ts_format", "ip_int_base", "platform_rule", "purchase_flag", "purchase_ts", "purchase_id",
           "purchase_amount")
REJECTS = "rejects.jsonl"
_FIELD_RE = re.compile(r"\{([^{}:!]*)")
_TRUE = {"1", "true", "yes", "y", "t"}


class MappingError(ValueError):
    """A mapping that cannot be used (unknown key, a column the file does not have, a bad option)."""


class Reject(ValueError):
    """One row that cannot be imported; the message is the reason."""


# --------------------------------------------------------------------------------------------------------------
# mappings


def parse_mapping(spec: str | Path | None) -> dict[str, Any]:
    """A mapping from ``k=v,k=v`` text or from a ``.toml`` / ``.json`` file (``spec`` names an existing file)."""
    if spec is None or spec == "":
        return {}
    p = Path(spec)
    if p.suffix.lower() in (".toml", ".json") and p.is_file():
        raw = p.read_bytes()
        try:
            return dict(tomllib.loads(raw.decode()) if p.suffix.lower() == ".toml" else json.loads(raw))
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise MappingError(f"{p}: {e}") from None
    out: dict[str, Any] = {}
    for item in str(spec).split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise MappingError(f"mapping entries are key=value, got {item!r}")
        out[k.strip()] = v.strip()
    return out


@dataclass(frozen=True)
class Getter:
    """How one field's value comes out of a row: a column, a template or a constant."""

    kind: str  # "column" | "template" | "const"
    text: str
    cols: tuple[str, ...] = ()  # the columns a template reads

    @staticmethod
    def of(value: Any) -> Getter:
        if not isinstance(value, str):
            return Getter("const", str(value))
        if value.startswith("="):
            return Getter("const", value[1:])
        if "{" in value:
            return Getter("template", value, tuple(dict.fromkeys(
                m for m in _FIELD_RE.findall(value) if not m.startswith("_"))))
        return Getter("column", value)

    def columns(self) -> set[str]:
        return {self.text} if self.kind == "column" else set(self.cols)

    def __call__(self, row: Mapping[str, Any], extra: Mapping[str, Any]) -> Any:
        if self.kind == "column":
            return row.get(self.text)
        if self.kind == "const":
            return self.text
        vals = {k: _int_float(row.get(k)) for k in self.cols}
        for k, v in vals.items():
            if v is None or v == "" or (isinstance(v, str) and not v.strip()):
                raise Reject(f"{k}: empty")
        try:
            return self.text.format(**vals, **extra)
        except (ValueError, KeyError, IndexError) as e:
            raise Reject(f"template {self.text!r}: {e}") from None


def _int_float(v: Any) -> Any:
    """5.0 -> 5 (a Parquet/JSON integer column with nulls comes as floats): "{device}" gives "5", not "5.0"."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() == "") or (isinstance(v, float) and v != v)


@dataclass
class TableMapping:
    """A parsed mapping: a getter per mapped field plus the options (see the module docstring)."""

    fields: dict[str, Getter]
    ts_format: str = "auto"
    ip_int_base: int | None = None
    platform_rule: dict[str, str] | None = None  # raw value -> platform
    platform_default: str | None = None
    purchase_flag: str | None = None
    purchase: dict[str, Getter] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, m: Mapping[str, Any], known: Sequence[str], required: Sequence[str]) -> TableMapping:
        unknown = [k for k in m if k not in known and k not in OPTIONS]
        if unknown:
            raise MappingError(f"unknown mapping keys {unknown} (fields: {', '.join(known)}; "
                               f"options: {', '.join(OPTIONS)})")
        missing = [k for k in required if k not in m]
        if missing:
            raise MappingError(f"the mapping must give {missing}")
        tm = cls({k: Getter.of(v) for k, v in m.items() if k in known}, raw=dict(m))
        tm.ts_format = str(m.get("ts_format", "auto"))
        if "ip_int_base" in m:
            try:
                tm.ip_int_base = int(ipaddress.IPv4Address(str(m["ip_int_base"])))
            except ValueError as e:
                raise MappingError(f"ip_int_base: {e}") from None
        rule = m.get("platform_rule")
        if rule is not None:
            if not isinstance(rule, Mapping):
                raise MappingError("platform_rule must be a table: {app = [...], desktop = [...], default = ...}")
            tm.platform_rule = {}
            for plat, values in rule.items():
                if plat == "default":
                    tm.platform_default = str(values)
                    continue
                if plat not in PLATFORMS:
                    raise MappingError(f"platform_rule: {plat!r} is not one of {PLATFORMS}")
                for v in values if isinstance(values, list) else [values]:
                    tm.platform_rule[str(v)] = plat
            if tm.platform_default is not None and tm.platform_default not in PLATFORMS:
                raise MappingError(f"platform_rule default: {tm.platform_default!r} is not one of {PLATFORMS}")
        if "purchase_flag" in m:
            tm.purchase_flag = str(m["purchase_flag"])
            if "purchase_ts" not in m:
                raise MappingError("purchase_flag needs purchase_ts (the purchase's time column)")
            tm.purchase = {"ts": Getter.of(m["purchase_ts"]),
                           "purchase_id": Getter.of(m.get("purchase_id", "{_click_id}-p"))}
            if "purchase_amount" in m:
                tm.purchase["amount"] = Getter.of(m["purchase_amount"])
        return tm

    def columns(self) -> set[str]:
        cols = set().union(*(g.columns() for g in (*self.fields.values(), *self.purchase.values())))
        return cols | ({self.purchase_flag} if self.purchase_flag else set())


# --------------------------------------------------------------------------------------------------------------
# values


def parse_ts(v: Any, fmt: str = "auto") -> int:
    """Epoch ms UTC from a number, a numeric string, an ISO 8601 string, a datetime, or a strftime format."""
    if _empty(v):
        raise Reject("empty")
    if isinstance(v, datetime):
        return _dt_ms(v)
    if fmt in ("epoch_s", "epoch_ms") or (fmt == "auto" and _is_number(v)):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise Reject(f"not a number: {str(v)[:40]!r}") from None
        if fmt == "epoch_s" or (fmt == "auto" and abs(x) < 1e11):  # 1e11 s is year 5138; 1e11 ms is 1973
            x *= 1000.0
        return round(x)
    s = str(v).strip()
    try:
        if fmt in ("auto", "iso"):
            return _dt_ms(datetime.fromisoformat(s))
        return _dt_ms(datetime.strptime(s, fmt))
    except ValueError:
        raise Reject(f"not a time ({fmt}): {s[:40]!r}") from None


def _is_number(v: Any) -> bool:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return True
    try:
        float(str(v))
    except ValueError:
        return False
    return True


def _dt_ms(d: datetime) -> int:
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return int(d.timestamp() * 1000)


def _str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _ip(v: Any, base: int | None) -> str:
    if base is None:
        return _str(v)
    try:
        code = int(_str(v))
    except ValueError:
        raise Reject(f"not an integer IP code: {str(v)[:40]!r}") from None
    if not 0 <= base + code < 1 << 32 or code < 0:
        raise Reject(f"IP code {code} out of range from base {ipaddress.IPv4Address(base)}")
    return str(ipaddress.IPv4Address(base + code))


# --------------------------------------------------------------------------------------------------------------
# reading


def read_rows(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """(column names, rows as dicts) of a CSV, JSON lines (``.jsonl``/``.json``/``.ndjson``) or Parquet file."""
    suf = path.suffix.lower()
    if suf == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)

        def parquet_rows() -> Iterator[dict[str, Any]]:
            for batch in pf.iter_batches(batch_size=65_536):
                yield from batch.to_pylist()

        return names, parquet_rows()
    if suf in (".jsonl", ".json", ".ndjson"):  # keys vary by line: no column list (a missing value is a reject)
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]

        def json_rows() -> Iterator[dict[str, Any]]:
            for line in lines:
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    yield {"__reject__": f"not valid JSON ({e})"}
                    continue
                yield obj if isinstance(obj, dict) else {"__reject__": "not a JSON object"}

        return [], json_rows()
    if suf in (".csv", ".tsv", ".txt"):
        f = open(path, newline="")  # noqa: SIM115 - closed by the generator
        reader = csv.DictReader(f, delimiter="\t" if suf == ".tsv" else ",")
        names = list(reader.fieldnames or [])

        def csv_rows() -> Iterator[dict[str, Any]]:
            with f:
                for r in reader:
                    if None in r:  # more values than columns
                        yield {"__reject__": f"{len(names) + len(r[None])} values for {len(names)} columns"}
                    else:
                        yield r

        return names, csv_rows()
    raise MappingError(f"{path}: unknown file type {suf!r} (csv, tsv, jsonl, parquet)")


# --------------------------------------------------------------------------------------------------------------
# converting


@dataclass
class ImportResult:
    clicks: list[Click]
    purchases: list[Purchase]
    rejects: list[dict[str, Any]]

    def reasons(self) -> dict[str, int]:
        """Reject counts by reason (the reason's field and kind, without the row's own values)."""
        c = Counter(r["reason"].split(": ")[0] + ": " + _kind(r["reason"]) for r in self.rejects)
        return dict(sorted(c.items(), key=lambda kv: -kv[1]))


def _kind(reason: str) -> str:
    rest = reason.partition(": ")[2]
    return re.sub(r"['\"].*", "", rest).strip().rstrip(":") or "invalid"


def _schema_reason(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return msg if not loc else f"{loc}: {msg}"


def _click(row: Mapping[str, Any], n: int, tm: TableMapping) -> Click:
    extra = {"_row": n}
    vals: dict[str, Any] = {}
    for name, g in tm.fields.items():
        try:
            v = g(row, extra)
        except Reject as e:
            raise Reject(f"{name}: {e}") from None
        if _empty(v):
            if name in CLICK_REQUIRED:
                raise Reject(f"{name}: empty")
            continue
        vals[name] = v
    for name, parse in (("ts", lambda v: parse_ts(v, tm.ts_format)), ("ip", lambda v: _ip(v, tm.ip_int_base))):
        try:
            vals[name] = parse(vals[name])
        except Reject as e:
            raise Reject(f"{name}: {e}") from None
    plat = _str(vals["platform"])
    if tm.platform_rule is not None:
        got = tm.platform_rule.get(plat, tm.platform_default)
        if got is None:
            raise Reject(f"platform: {plat!r} matches no platform_rule entry and there is no default")
        plat = got
    vals["platform"] = plat.lower()
    for k in ("click_id", "session_id", "customer_id", "user_agent", "ad_id", "campaign_id", "advertiser_id",
              "placement"):
        if k in vals:
            vals[k] = _str(vals[k])
    for name, num in (("cpc", float), ("tz_offset_min", lambda v: int(float(v)))):
        if name in vals:
            try:
                vals[name] = num(vals[name])
            except ValueError:
                raise Reject(f"{name}: not a number: {str(vals[name])[:40]!r}") from None
    vals["logged_in"] = "customer_id" in vals
    try:
        return Click(**vals)
    except ValidationError as e:
        raise Reject(_schema_reason(e)) from None


def _flagged(v: Any) -> bool:
    return not _empty(v) and _str(v).lower() in _TRUE


def _purchase_from_click(row: Mapping[str, Any], n: int, c: Click, tm: TableMapping) -> Purchase:
    extra = {"_row": n, "_click_id": c.click_id}
    try:
        ts = parse_ts(tm.purchase["ts"](row, extra), tm.ts_format)
    except Reject as e:
        raise Reject(f"purchase_ts: {e}") from None
    pid = _str(tm.purchase["purchase_id"](row, extra))
    amount = tm.purchase["amount"](row, extra) if "amount" in tm.purchase else 0.0
    try:
        return Purchase(purchase_id=pid, click_id=c.click_id, ts=ts, customer_id=c.customer_id,
                        amount=float(amount or 0.0))
    except (ValidationError, ValueError) as e:
        raise Reject(_schema_reason(e) if isinstance(e, ValidationError) else f"purchase_amount: {e}") from None


def _purchase(row: Mapping[str, Any], n: int, tm: TableMapping) -> Purchase:
    extra = {"_row": n}
    vals: dict[str, Any] = {}
    for name, g in tm.fields.items():
        v = g(row, extra)
        if _empty(v):
            if name in PURCHASE_REQUIRED:
                raise Reject(f"{name}: empty")
            continue
        vals[name] = v
    try:
        vals["ts"] = parse_ts(vals["ts"], tm.ts_format)
    except Reject as e:
        raise Reject(f"ts: {e}") from None
    for k in ("purchase_id", "click_id", "customer_id"):
        if k in vals:
            vals[k] = _str(vals[k])
    try:
        if "amount" in vals:
            vals["amount"] = float(vals["amount"])
        return Purchase(**vals)
    except ValidationError as e:
        raise Reject(_schema_reason(e)) from None
    except ValueError:
        raise Reject("amount: not a number") from None


def _rows(paths: Sequence[Path], tm: TableMapping) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, row number in it, row) over all files, after checking the mapped columns exist in each."""
    need = tm.columns()
    for p in paths:
        names, rows = read_rows(p)
        missing = sorted(need - set(names))
        if missing and p.suffix.lower() not in (".jsonl", ".json", ".ndjson"):  # JSON keys vary by line
            raise MappingError(f"{p}: the mapping uses columns {missing} that the file does not have "
                               f"(it has {names})")
        for i, r in enumerate(rows, start=1):
            yield p, i, r


def _reject(rejects: list[dict[str, Any]], p: Path, i: int, reason: str, row: Mapping[str, Any]) -> None:
    data = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in row.items()
            if not k.startswith("__")}
    rejects.append({"file": p.name, "row": i, "reason": reason, "row_data": data})


def convert(paths: Sequence[Path], mapping: Mapping[str, Any], purchase_paths: Sequence[Path] = (),
            purchase_mapping: Mapping[str, Any] | None = None, *, limit: int | None = None) -> ImportResult:
    """Rows of ``paths`` (and ``purchase_paths``) -> clicks and purchases sorted by time, and the rejects."""
    tm = TableMapping.parse(mapping, CLICK_FIELDS, CLICK_REQUIRED)
    clicks: list[tuple[int, int, Click]] = []
    purchases: list[tuple[int, int, Purchase]] = []
    rejects: list[dict[str, Any]] = []
    first_row: dict[str, tuple[str, int]] = {}
    n = 0
    for p, i, row in _rows(paths, tm):
        if limit is not None and n >= limit:
            break
        n += 1
        try:
            if "__reject__" in row:
                raise Reject(f"row: {row['__reject__']}")
            c = _click(row, n, tm)
            if c.click_id in first_row:
                f, r = first_row[c.click_id]
                raise Reject(f"click_id: duplicate of {f} row {r}")
            pur = _purchase_from_click(row, n, c, tm) if tm.purchase_flag and _flagged(row.get(tm.purchase_flag)) \
                else None
        except Reject as e:
            _reject(rejects, p, i, str(e), row)
            continue
        first_row[c.click_id] = (p.name, i)
        clicks.append((c.ts, n, c))
        if pur is not None:
            purchases.append((pur.ts, n, pur))
    if purchase_paths:
        pm = TableMapping.parse(purchase_mapping or {}, PURCHASE_FIELDS, PURCHASE_REQUIRED)
        seen: set[str] = set()
        for k, (p, i, row) in enumerate(_rows(purchase_paths, pm), start=n + 1):
            try:
                if "__reject__" in row:
                    raise Reject(f"row: {row['__reject__']}")
                pur = _purchase(row, k, pm)
                if pur.click_id not in first_row:
                    raise Reject("click_id: not among the imported clicks")
                if pur.purchase_id in seen:
                    raise Reject("purchase_id: duplicate")
            except Reject as e:
                _reject(rejects, p, i, str(e), row)
                continue
            seen.add(pur.purchase_id)
            purchases.append((pur.ts, k, pur))
    clicks.sort(key=lambda x: (x[0], x[1]))
    purchases.sort(key=lambda x: (x[0], x[1]))
    return ImportResult([c for *_, c in clicks], [p for *_, p in purchases], rejects)


def _sha(path: Path) -> str:
    from models.registry import sha256_file

    return sha256_file(path)


def import_table(paths: Sequence[str | Path], out: str | Path, mapping: Mapping[str, Any], *,
                 purchases: Sequence[str | Path] = (), purchase_mapping: Mapping[str, Any] | None = None,
                 limit: int | None = None) -> dict[str, Any]:
    """Import files into the dataset folder ``out`` (plus ``rejects.jsonl``); returns the written meta."""
    ps, pps = [Path(p) for p in paths], [Path(p) for p in purchases]
    res = convert(ps, mapping, pps, purchase_mapping, limit=limit)
    slice_counts = Counter(c.slice for c in res.clicks)
    start = res.clicks[0].ts if res.clicks else 0
    end = res.clicks[-1].ts if res.clicks else 0
    meta: dict[str, Any] = {
        "source": "table", "scenario": None, "seed": None,
        "inputs": [{"file": p.name, "sha256": _sha(p)} for p in (*ps, *pps)],
        "mapping": dict(mapping), "purchase_mapping": dict(purchase_mapping or {}),
        "start_ms": start, "end_ms": end + 1, "days": round((end + 1 - start) / 86_400_000, 3),
        "drift": None, "label_outages": [], "slice_counts": dict(sorted(slice_counts.items())),
        "platform_rule": mapping.get("platform_rule"),
        "rejected": {"rows": len(res.rejects), "reasons": res.reasons()},
    }
    d = write_dataset(out, res.clicks, res.purchases, (), (), None, meta)
    write_jsonl(d / REJECTS, res.rejects)
    return dict(orjson.loads((d / "meta.json").read_bytes()))
