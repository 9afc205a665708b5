"""Build a campaign's export from MyCfia's DB: JSON document + targets CSV + manifest.

Everything is checked against the JSON Schema before anything gets a final name:
the document as a whole (jsonschema, once), then each target row
(``$defs/target``) while the CSV streams to disk (100k targets are never held in
memory; only their ``client_reference``, which must be unique in the campaign). Rows go through a check compiled from the schema
(:mod:`~cfi_pipelines.exports.fastcheck`, ~30x faster than jsonschema); only an
invalid row is handed to jsonschema, for its errors. Every problem is reported
with its JSON pointer; an invalid campaign yields an :class:`ExportBundle` with
``errors`` and no files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from cfi_pipelines.exports.csvfile import CSV_COLUMNS, neutralise, open_writer
from cfi_pipelines.exports.errors import CampaignNotExportable
from cfi_pipelines.exports.fastcheck import Unsupported, compile_check
from cfi_pipelines.model import mycfia
from cfi_pipelines.schemas import CAMPAIGN_EXPORT_VERSION, load_schema, with_ecma_anchors

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 50
"""Errors kept per campaign (the total is always counted)."""
MAX_TARGETS = 1_000_000
"""Absurd-size guard, mirrored by the schema's ``targets.count`` maximum."""
_CONTENT_KEYS = ("budget", "schedule", "segments", "messages")


@dataclass(frozen=True)
class Issue:
    """One validation problem: where (RFC 6901 JSON pointer) and why."""

    pointer: str
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message}"


@dataclass
class ExportBundle:
    """The local result of building one campaign revision's export."""

    campaign_id: int
    revision: int
    tenant_code: str
    validated_at: datetime | None
    directory: Path | None = None
    row_count: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # json/csv/manifest
    errors: list[Issue] = field(default_factory=list)
    error_count: int = 0

    @property
    def valid(self) -> bool:
        return self.error_count == 0

    @property
    def stem(self) -> str:
        return file_stem(self.campaign_id, self.revision)

    def local_path(self, kind: str) -> Path:
        assert self.directory is not None
        return self.directory / self.files[kind]["name"]

    def error_text(self, limit: int = 20) -> str:
        """The errors as readable lines, for logs, the DB and the UI."""
        lines = [f"campaign {self.campaign_id} r{self.revision}: {e}" for e in self.errors[:limit]]
        if self.error_count > len(lines):
            lines.append(f"... and {self.error_count - len(lines)} more")
        return "\n".join(lines)


def load_bundle(manifest_path: Path, validated_at: datetime | None = None) -> ExportBundle:
    """The :class:`ExportBundle` of files built earlier, from their manifest."""
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    bundle = ExportBundle(
        campaign_id=manifest["campaign_id"],
        revision=manifest["revision"],
        tenant_code=manifest["tenant_code"],
        validated_at=validated_at,
        directory=Path(manifest_path).parent,
        row_count=manifest["row_count"],
        files={k: dict(v) for k, v in manifest["files"].items()},
    )
    data = Path(manifest_path).read_bytes()
    bundle.files["manifest"] = {
        "name": Path(manifest_path).name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return bundle


def file_stem(campaign_id: int, revision: int) -> str:
    """``campaign_<id>_r<revision>``: the stem of the three delivered files."""
    return f"campaign_{int(campaign_id)}_r{int(revision)}"


def pointer(path: Any) -> str:
    """RFC 6901 JSON pointer of a jsonschema path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0, DEL, C1 and the Unicode line/paragraph separators: what ``$defs/line`` excludes."""


def describe(error: ValidationError) -> str:
    """A readable, bounded message (never echoes a megabyte-long value)."""
    v = error.validator
    value = error.instance
    if v == "maxLength":
        return f"is {len(value)} characters long, more than {error.validator_value}"
    if v == "minLength":
        return "must not be empty" if not value else f"is shorter than {error.validator_value}"
    if v == "pattern":
        if isinstance(value, str) and _CONTROL.search(value):
            return "contains a control character"
        pattern = str(error.validator_value)
        if pattern.endswith("\\Z"):  # shown as the schema file writes it (see with_ecma_anchors)
            pattern = pattern[:-2] + "$"
        return f"{_short(value)} is not allowed here (must match {pattern})"
    if v == "anyOf" and isinstance(value, dict) and "client_reference" in value:
        return "a target needs an email or a phone"
    if v in ("maxItems", "maxProperties"):
        return f"has {len(value)} entries, more than {error.validator_value}"
    if v == "maximum":
        return f"{_short(value)} is more than the maximum {error.validator_value}"
    msg = error.message
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # the DBs store naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Collector:
    def __init__(self) -> None:
        self.errors: list[Issue] = []
        self.count = 0

    def add(self, ptr: str, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(Issue(ptr, message))

    def add_schema_errors(self, validator: Draft202012Validator, doc: Any, prefix: str) -> None:
        for err in sorted(
            validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))
        ):
            self.add(prefix + pointer(err.absolute_path), describe(err))


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    # Local "#/$defs/x" references resolved once: per-row validation of 100k
    # targets then skips the reference lookups (about a third of its cost).
    if isinstance(node, dict):
        ref = node.get("$ref")
        out = {k: _inline_refs(v, defs) for k, v in node.items() if k != "$ref"}
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
            if not out:
                return target
            return {"allOf": [target], **out}
        if ref is not None:
            out["$ref"] = ref
        return out
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


@lru_cache(maxsize=1)
def validators() -> tuple[Draft202012Validator, Draft202012Validator]:
    """(document validator, target-row validator), built once."""
    schema = with_ecma_anchors(load_schema(CAMPAIGN_EXPORT_VERSION))
    target_schema = _inline_refs(schema["$defs"]["target"], schema["$defs"])
    return Draft202012Validator(schema), Draft202012Validator(target_schema)


@lru_cache(maxsize=1)
def target_check() -> Callable[[Any], bool]:
    """Valid-or-not test of one target row: the schema compiled by
    :mod:`~cfi_pipelines.exports.fastcheck` (about 20x faster than jsonschema), or
    jsonschema's own ``is_valid`` if the schema uses a keyword it does not compile."""
    _, validator = validators()
    try:
        return compile_check(validator.schema)
    except Unsupported as exc:
        log.warning("target rows validated by jsonschema (slower): %s", exc)
        return validator.is_valid


def target_is_valid(target: dict[str, Any]) -> bool:
    """True when ``target`` matches ``$defs/target`` (the errors come from jsonschema)."""
    return target_check()(target)


def _text_columns(conn: sa.Connection, table: sa.Table, names: list[str]) -> list[Any]:
    # SQLite stores whatever bytes it is given: read text as bytes and decode it
    # ourselves, so that one non-UTF-8 value is reported, not a crash of the query.
    if conn.dialect.name == "sqlite":
        return [sa.cast(table.c[n], sa.LargeBinary).label(n) for n in names]
    return [table.c[n] for n in names]


def _decode(value: Any, ptr: str, errors: _Collector) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.add(
                ptr, f"is not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
            )
            return raw.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            errors.add(ptr, f"is not valid UTF-8 text (lone surrogate at offset {exc.start})")
            return value.encode("utf-8", errors="replace").decode("utf-8")
    return value


_CAMPAIGN_TEXT = ["tenant_code", "operation_code", "name", "channel", "status", "content"]
# the target's own text columns: the CSV's, less those the export adds
_TARGET_TEXT = [c for c in CSV_COLUMNS if c not in ("campaign_id", "revision", "position")]


def _load_campaign(conn: sa.Connection, campaign_id: int, errors: _Collector) -> dict[str, Any]:
    c = mycfia.campaigns.c
    cols = [
        c.id,
        c.revision,
        c.validated_at,
        c.updated_at,
        *_text_columns(conn, mycfia.campaigns, _CAMPAIGN_TEXT),
    ]
    row = conn.execute(sa.select(*cols).where(c.id == campaign_id)).mappings().first()
    if row is None:
        raise CampaignNotExportable(f"campaign {campaign_id} does not exist in MyCfia's DB")
    out = dict(row)
    for name in _CAMPAIGN_TEXT:
        ptr = "/campaign/" + ("content" if name == "content" else name)
        out[name] = _decode(out[name], ptr, errors)
    if (why := not_exportable_reason(campaign_id, out["revision"], out["status"])) is not None:
        raise CampaignNotExportable(why)
    return out


def not_exportable_reason(campaign_id: int, revision: int, status: str | None) -> str | None:
    """Why a campaign in MyCfia status ``status`` is not exported, or None (validated)."""
    if status == "validated":
        return None
    return (
        f"campaign {campaign_id} r{revision} is {status!r}, not 'validated': "
        "only validated campaigns are exported"
    )


def build_document(row: dict[str, Any], target_count: int, errors: _Collector) -> dict[str, Any]:
    """The export document of a campaign row (not yet validated)."""
    campaign: dict[str, Any] = {
        "id": row["id"],
        "revision": row["revision"],
        "tenant_code": row["tenant_code"],
        "operation_code": row["operation_code"],
        "name": row["name"],
        "channel": row["channel"],
        "validated_at": _iso(row["validated_at"]),
    }
    try:
        content = json.loads(row["content"])
    except (TypeError, ValueError) as exc:
        errors.add("/campaign/content", f"is not valid JSON ({exc})")
        content = {}
    if not isinstance(content, dict):
        errors.add("/campaign/content", "must be a JSON object")
        content = {}
    # Unknown content keys are kept so that the schema reports them.
    campaign.update({k: content[k] for k in _CONTENT_KEYS if k in content})
    campaign.update({k: v for k, v in content.items() if k not in _CONTENT_KEYS})
    return {
        "schema_version": CAMPAIGN_EXPORT_VERSION,
        "generated_at": _iso(row["updated_at"]),
        "campaign": campaign,
        "targets": {
            "file": f"{file_stem(row['id'], row['revision'])}.csv",
            "count": target_count,
            "columns": list(CSV_COLUMNS),
        },
    }


def _semantic_checks(doc: dict[str, Any], errors: _Collector) -> None:
    # What a schema cannot say: messages address declared segments; time runs forward.
    campaign = doc.get("campaign", {})
    segments = campaign.get("segments")
    codes = (
        {s.get("code") for s in segments if isinstance(s, dict)}
        if isinstance(segments, list)
        else set()
    )
    messages = campaign.get("messages")
    if isinstance(messages, list):
        for i, msg in enumerate(messages):
            if (
                isinstance(msg, dict)
                and isinstance(msg.get("segment"), str)
                and msg["segment"] not in codes
            ):
                errors.add(f"/campaign/messages/{i}/segment", f"unknown segment {msg['segment']!r}")
    schedule = campaign.get("schedule")
    if isinstance(schedule, dict):
        start, end = schedule.get("starts_at"), schedule.get("ends_at")
        if isinstance(start, str) and isinstance(end, str) and end < start:
            errors.add("/campaign/schedule/ends_at", "is before starts_at")


def _target_rows(conn: sa.Connection, campaign_id: int) -> Iterator[dict[str, Any]]:
    t = mycfia.campaign_targets.c
    cols = [t.position, *_text_columns(conn, mycfia.campaign_targets, _TARGET_TEXT)]
    query = sa.select(*cols).where(t.campaign_id == campaign_id).order_by(t.position)
    # yield_per streams from the server cursor instead of fetching all rows.
    for row in conn.execution_options(yield_per=2000).execute(query).mappings():
        yield dict(row)


def _write_targets(conn: sa.Connection, row: dict[str, Any], path: Path, errors: _Collector) -> int:
    _, target_validator = validators()
    is_valid = target_check()
    campaign_id, revision = row["id"], row["revision"]
    count = 0
    first_index: dict[str, int] = {}  # client_reference -> index of its first target: O(n)
    with open(path, "w", encoding="utf-8", newline="") as stream:
        writer = open_writer(stream)
        writer.writerow(CSV_COLUMNS)
        for index, target in enumerate(_target_rows(conn, campaign_id)):
            base = f"/targets/{index}"
            rec: dict[str, Any] = {}
            for name in _TARGET_TEXT:
                value = _decode(target[name], f"{base}/{name}", errors)
                if value is not None:
                    rec[name] = value
            if "personalisation" in rec:
                try:
                    rec["personalisation"] = json.loads(rec["personalisation"])
                except ValueError:
                    errors.add(f"{base}/personalisation", "is not valid JSON")
                    rec.pop("personalisation")
            if not is_valid(rec):  # fast; jsonschema only to explain a bad row
                errors.add_schema_errors(target_validator, rec, base)
            ref = rec.get("client_reference")
            if isinstance(ref, str):
                first = first_index.setdefault(ref, index)
                if first != index:  # what a row-by-row schema cannot see
                    errors.add(
                        f"{base}/client_reference",
                        f"duplicate client_reference {_short(ref)}: already used by "
                        f"/targets/{first}",
                    )
            count += 1
            if errors.count:
                continue  # keep validating, stop writing: the file is discarded anyway
            perso = rec.get("personalisation")
            cells = [
                campaign_id,
                revision,
                target["position"],
                rec.get("client_reference"),
                rec.get("email"),
                rec.get("phone"),
                rec.get("segment"),
                rec.get("first_name"),
                rec.get("last_name"),
                json.dumps(perso, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                if perso
                else None,
            ]
            writer.writerow([neutralise("" if v is None else str(v)) for v in cells])
    return count


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_export(conn: sa.Connection, campaign_id: int, outbox: Path) -> ExportBundle:
    """Build and validate the export of ``campaign_id``'s current revision under ``outbox``.

    Files land in ``outbox/<tenant code>/`` under their final names only when the
    whole campaign is valid; otherwise the bundle carries ``errors`` and no files.
    Raises :class:`CampaignNotExportable` when the campaign is missing or not validated.
    Run it inside one transaction so that the campaign and its targets agree.
    """
    errors = _Collector()
    row = _load_campaign(conn, campaign_id, errors)
    bundle = ExportBundle(
        campaign_id=row["id"],
        revision=row["revision"],
        tenant_code=row["tenant_code"] or "",
        validated_at=row["validated_at"],
    )
    t = mycfia.campaign_targets.c
    count = conn.execute(
        sa.select(sa.func.count())
        .select_from(mycfia.campaign_targets)
        .where(t.campaign_id == campaign_id)
    ).scalar_one()
    doc = build_document(row, count, errors)
    doc_validator, _ = validators()
    errors.add_schema_errors(doc_validator, doc, "")
    _semantic_checks(doc, errors)

    outbox.mkdir(parents=True, exist_ok=True)
    stem = bundle.stem
    tmp_csv = outbox / f".{stem}.{os.getpid()}.csv.part"
    try:
        if count <= MAX_TARGETS:  # never stream an absurd campaign to disk
            bundle.row_count = _write_targets(conn, row, tmp_csv, errors)
        bundle.errors, bundle.error_count = errors.errors, errors.count
        if not bundle.valid:
            return bundle
        # The tenant code passed the schema (no separator, no '..'): safe as a folder.
        directory = outbox / bundle.tenant_code
        directory.mkdir(parents=True, exist_ok=True)
        csv_path = directory / f"{stem}.csv"
        os.replace(tmp_csv, csv_path)
    finally:
        tmp_csv.unlink(missing_ok=True)

    json_bytes = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    json_path = directory / f"{stem}.json"
    _write_atomic(json_path, json_bytes)
    bundle.directory = directory
    bundle.files = {
        "json": {
            "name": json_path.name,
            "bytes": len(json_bytes),
            "sha256": hashlib.sha256(json_bytes).hexdigest(),
        },
        "csv": {
            "name": csv_path.name,
            "bytes": csv_path.stat().st_size,
            "sha256": _sha256(csv_path),
        },
    }
    manifest = {
        "schema_version": CAMPAIGN_EXPORT_VERSION,
        "campaign_id": bundle.campaign_id,
        "revision": bundle.revision,
        "tenant_code": bundle.tenant_code,
        # The revision's own timestamp, so a re-export is byte-identical (idempotent).
        "generated_at": doc["generated_at"],
        "row_count": bundle.row_count,
        "files": {k: dict(v) for k, v in bundle.files.items()},
    }
    manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    manifest_path = directory / f"{stem}.manifest.json"
    _write_atomic(manifest_path, manifest_bytes)
    bundle.files["manifest"] = {
        "name": manifest_path.name,
        "bytes": len(manifest_bytes),
        "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
    }
    return bundle
