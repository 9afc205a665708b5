"""The export definitions load, and the CLI export goes through Dagster to the dev server."""

from __future__ import annotations

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.definitions import build_resources
from cfi_pipelines.devtools.seed_mycfia import add_campaign
from cfi_pipelines.devtools.sftp_server import DevSFTPServer
from cfi_pipelines.exports_defs import build_export_defs, export_command
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.alerts import build_alerts_resource


def test_defs_load_with_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    monkeypatch.delenv("CFI_SFTP_HOST", raising=False)
    defs = build_export_defs(retry_delay=0)
    # "alerts" comes from fallback_defs in the code location
    others = dg.Definitions(resources={**build_resources(), "alerts": build_alerts_resource()})
    dg.Definitions.validate_loadable(dg.Definitions.merge(defs, others))
    assert defs.resources["sftp"].host == "127.0.0.1"
    assert defs.resources["sftp"].write_size == 0  # negotiated with the server
    assert {s.name for s in defs.sensors} == {"validated_campaigns_sensor"}


def test_export_command_delivers_then_skips_then_forces(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    monkeypatch.setenv("CFI_EXPORT_RETRY_DELAY", "0")
    server = DevSFTPServer(port=0)
    monkeypatch.setenv("CFI_SFTP_PORT", str(server.port))
    try:
        engine = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
        mycfia.metadata.create_all(engine)
        with engine.begin() as conn:
            add_campaign(conn, 42, tenant_code="T042")
        assert export_command(42) == 0
        assert (server.paths.root / "T042" / "campaign_42_r1.manifest.json").exists()
        assert export_command(42) == 0
        assert "already delivered" in capsys.readouterr().out
        assert export_command(42, force=True) == 0
        with engine.connect() as conn:
            assert conn.execute(sa.select(mycfia.campaign_exports.c.attempts)).scalar() == 2
    finally:
        server.stop()
