"""Build and deliver one campaign export: each step as a plain function.

:func:`build_campaign` builds and validates a campaign's files in the outbox and
records ``pending`` or ``rejected`` in ``campaign_exports``.
:func:`deliver_campaign` loads what was built, uploads it over an SFTP connection
(:func:`cfi_pipelines.exports.delivery.deliver`), records the outcome and returns
a :class:`DeliveryOutcome` that says whether a retry can help. The Dagster assets
(one campaign per run) and the batch op (many campaigns per run, one connection:
:class:`SharedSession`) only turn the outcomes into events and alerts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import sqlalchemy as sa

from cfi_pipelines.clock import iso_z, utcnow
from cfi_pipelines.db import write_transaction
from cfi_pipelines.exports.delivery import BUG, PERMANENT, Delivery, classify_error, deliver
from cfi_pipelines.exports.document import ExportBundle, build_export, load_bundle
from cfi_pipelines.exports.errors import ExportError
from cfi_pipelines.exports.records import (
    MAX_AUTO_RETRIES,
    TRANSIENT,
    latest_export,
    record_delivered,
    record_export,
    record_failed_attempt,
)
from cfi_pipelines.exports.records import PERMANENT as PERMANENT_FAILURE
from cfi_pipelines.exports.sftp_client import (
    EmbeddedServerDown,
    HostKeyError,
    KeyLoadError,
    SFTPConnection,
)
from cfi_pipelines.model import mycfia as model


class NotDeliverable(ExportError):
    """The campaign has no valid built export to deliver (rejected, or never built)."""


@dataclass(frozen=True)
class SFTPTarget:
    """Where to deliver, and how to open a connection there."""

    host: str
    port: int
    target: str  # user@host:port, for messages
    remote_dir: str
    open_session: Callable[[], AbstractContextManager[SFTPConnection]]


@dataclass(frozen=True)
class DeliveryOutcome:
    """One delivery attempt's result. ``retry``: a later attempt of this run may succeed;
    ``next_attempt_at``: a final transient failure that the sensor re-tries then."""

    campaign_id: int
    revision: int
    status: Literal["delivered", "pending", "failed"]
    message: str
    retry: bool = False
    error_type: str | None = None
    bundle: ExportBundle | None = None
    delivery: Delivery | None = None
    write_size: int | None = None
    seconds_from_validation: float | None = None
    next_attempt_at: datetime | None = None
    was_delivered: bool = False
    """The revision was delivered before this attempt (a re-send): it stays delivered."""

    @property
    def delivered(self) -> bool:
        return self.status == "delivered"

    @property
    def final_failure(self) -> bool:
        """Failed for good and not on CFI's drop: the operator must act (alert once)."""
        return self.status == "failed" and not self.was_delivered

    @property
    def resend_failed(self) -> bool:
        """A re-send that failed for good: the earlier delivery's files are still on the drop."""
        return self.status == "failed" and self.was_delivered


def build_campaign(
    engine: sa.Engine, campaign_id: int, outbox: Path, run_id: str | None
) -> ExportBundle:
    """Build and validate the campaign's current revision in ``outbox`` and record it:
    ``pending`` (valid), ``rejected`` (with its errors), or still ``delivered`` when that
    revision already is (a re-send keeps its first delivery time). Raises
    :class:`~cfi_pipelines.exports.errors.CampaignNotExportable` (draft, unknown...)."""
    with write_transaction(engine) as conn:  # one transaction: campaign and targets agree
        bundle = build_export(conn, campaign_id, outbox)
        common = {
            "run_id": run_id,
            "requested_at": utcnow(),
            "validated_at": bundle.validated_at,
            "row_count": bundle.row_count,
        }
        if bundle.valid:
            e = model.campaign_exports.c
            was_delivered = (
                conn.execute(
                    sa.select(e.status).where(
                        e.campaign_id == campaign_id, e.revision == bundle.revision
                    )
                ).scalar()
                == "delivered"
            )
            record_export(
                conn,
                campaign_id,
                bundle.revision,
                status="delivered" if was_delivered else "pending",
                error=None,
                local_manifest=str(bundle.local_path("manifest")),
                json_sha256=bundle.files["json"]["sha256"],
                json_bytes=bundle.files["json"]["bytes"],
                csv_sha256=bundle.files["csv"]["sha256"],
                csv_bytes=bundle.files["csv"]["bytes"],
                **common,
            )
        else:
            record_export(
                conn,
                campaign_id,
                bundle.revision,
                status="rejected",
                error=bundle.error_text(),
                delivered_at=None,
                **common,
            )
    return bundle


class SharedSession:
    """One SFTP connection reused by many deliveries (a batch run), opened on first use.

    ``session`` is what :class:`SFTPTarget` wants as ``open_session``: it yields the
    open connection and does not close it, except when the delivery using it raised
    (the link may be broken: the next delivery opens a new one). :meth:`close` at the
    end. ``opened`` counts connections; ``open_error`` is the last failure to connect
    (None once a connection opened). After :meth:`give_up`, every ``session`` fails at
    once with a transient error: the server was unreachable on every attempt, the
    remaining campaigns are recorded failed (and re-tried later) without waiting again.
    """

    def __init__(self, open_: Callable[[], SFTPConnection]) -> None:
        self._open = open_
        self._conn: SFTPConnection | None = None
        self.opened = 0
        self.open_error: BaseException | None = None
        self._gave_up: str | None = None

    def give_up(self, why: str) -> None:
        self._gave_up = why

    @property
    def gave_up(self) -> bool:
        return self._gave_up is not None

    @contextmanager
    def session(self) -> Iterator[SFTPConnection]:
        if self._gave_up is not None:
            raise ConnectionError(self._gave_up)
        if self._conn is None:
            try:
                self._conn = self._open()
            except BaseException as exc:
                self.open_error = exc
                raise
            self.open_error = None
            self.opened += 1
        try:
            yield self._conn
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # may be broken already: best effort
                conn.close()

    def close(self) -> None:
        self.discard()


def deliver_campaign(
    engine: sa.Engine, sftp: SFTPTarget, campaign_id: int, *, attempt: int, max_attempts: int
) -> DeliveryOutcome:
    """Attempt ``attempt`` (1-based) of ``max_attempts`` to deliver the campaign's newest
    built revision. Raises :class:`NotDeliverable` when there is nothing valid to send."""
    with engine.connect() as conn:
        row = latest_export(conn, campaign_id)
    if row is None or row.status == "rejected" or not row.local_manifest:
        why = "was rejected:\n" + (row.error or "") if row is not None else "has not been built"
        raise NotDeliverable(f"campaign {campaign_id} {why}")
    revision = row.revision
    was_delivered = row.status == "delivered"
    where = f"campaign {campaign_id} r{revision} to {sftp.target}"

    def failed(
        message: str, exc: BaseException, retry: bool, *, transient: bool = False
    ) -> DeliveryOutcome:
        with write_transaction(engine) as conn:
            next_attempt_at = record_failed_attempt(
                conn,
                campaign_id,
                revision,
                message,
                final=not retry,
                kind=TRANSIENT if transient else PERMANENT_FAILURE,
            )
        if transient and not retry:
            if next_attempt_at is not None:
                message += (
                    f" Meanwhile Dagster re-tries it automatically from {iso_z(next_attempt_at)} "
                    f"(then with growing delays, at most {MAX_AUTO_RETRIES} re-tries)."
                )
            else:
                message += f" Its {MAX_AUTO_RETRIES} automatic re-tries are spent."
        return DeliveryOutcome(
            campaign_id,
            revision,
            "pending" if retry else "failed",
            message,
            retry=retry,
            error_type=type(exc).__name__,
            bundle=bundle,
            next_attempt_at=next_attempt_at,
            was_delivered=was_delivered,
        )

    bundle: ExportBundle | None = None
    try:
        bundle = load_bundle(Path(row.local_manifest), row.validated_at)
    except (OSError, ValueError, KeyError) as exc:
        return failed(
            f"campaign {campaign_id} r{revision}: the built files are gone or damaged "
            f"({type(exc).__name__}: {exc}). Rebuild them: re-materialize partition "
            f"{campaign_id} of both export assets (`cfi-pipelines export {campaign_id} --force`).",
            exc,
            retry=False,
        )
    try:
        with sftp.open_session() as session:  # one connection for all the files
            delivery = deliver(session.sftp, bundle, sftp.remote_dir, session.write_size)
    except Exception as exc:
        kind = classify_error(exc)
        detail = f"{type(exc).__name__}: {exc}"
        if kind == BUG:
            # A defect of the export code: the same code on the same data fails again.
            return failed(
                f"{where}: unexpected error in the export code, not retried: {detail}. "
                "This is a bug, not a network problem: report it with this run's logs; "
                f"once fixed, re-export with `cfi-pipelines export {campaign_id} --force`.",
                exc,
                retry=False,
            )
        if kind == PERMANENT:
            says_what_to_do = HostKeyError | EmbeddedServerDown | KeyLoadError
            hint = (
                ""
                if isinstance(exc, says_what_to_do)
                else " Check CFI_SFTP_USER, CFI_SFTP_KEY and the server's authorized_keys "
                "and permissions on CFI_SFTP_DIR; retrying cannot help."
            )
            return failed(f"{where}: {detail}.{hint}", exc, retry=False)
        final = attempt >= max_attempts
        message = f"{where}, attempt {attempt}/{max_attempts}: {detail}"
        if final:
            message += (
                f". The SFTP server {sftp.host}:{sftp.port} was unreachable or dropped the "
                "connection on every attempt: check that it is up and reachable from Dagster "
                f"(host, port, firewall), then `cfi-pipelines export {campaign_id} --force`."
            )
        return failed(message, exc, retry=not final, transient=True)

    delivered_at = utcnow()
    latency = (delivered_at - bundle.validated_at).total_seconds() if bundle.validated_at else None
    with write_transaction(engine) as conn:
        record_delivered(
            conn,
            campaign_id,
            revision,
            # the first delivery time: a re-send does not move it (export latency KPI)
            delivered_at=sa.func.coalesce(model.campaign_exports.c.delivered_at, delivered_at),
            json_path=delivery.remote_paths["json"],
            csv_path=delivery.remote_paths["csv"],
            manifest_path=delivery.remote_paths["manifest"],
        )
    return DeliveryOutcome(
        campaign_id,
        revision,
        "delivered",
        f"delivered {where} in {delivery.seconds:.2f}s (attempt {attempt})",
        bundle=bundle,
        delivery=delivery,
        write_size=session.write_size,
        seconds_from_validation=latency,
    )
