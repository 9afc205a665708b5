"""MyCfia's schema is portable: created on SQLite, compiled for PostgreSQL and SQL Server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql, postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from cfi_pipelines.model import mycfia


@pytest.mark.parametrize("dialect", [postgresql.dialect(), mssql.dialect()])
def test_ddl_compiles(dialect):
    for table in mycfia.metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=dialect))
        assert table.name in ddl
        for index in table.indexes:
            assert str(CreateIndex(index).compile(dialect=dialect))


def test_sqlite_create_and_unique_export_per_revision(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    mycfia.metadata.create_all(engine)
    names = set(sa.inspect(engine).get_table_names())
    assert {"campaigns", "campaign_targets", "campaign_exports"} <= names
    row = {"campaign_id": 1, "revision": 1, "status": "pending", "attempts": 0}
    stamps = {
        "requested_at": sa.func.current_timestamp(),
        "updated_at": sa.func.current_timestamp(),
    }
    with engine.begin() as conn:
        conn.execute(sa.insert(mycfia.campaign_exports).values(**row, **stamps))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.insert(mycfia.campaign_exports).values(**row, **stamps))
