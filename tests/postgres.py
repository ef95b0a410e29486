"""Throwaway databases on the PostgreSQL server that `.ci/postgres.sh` starts (no tests in here).

`MEDSEG_TEST_POSTGRES` holds the server's URL base, e.g. ``postgresql://medseg:medseg@127.0.0.1:55432``
(``export MEDSEG_TEST_POSTGRES="$(.ci/postgres.sh | tail -1)"``; `.ci/run` does it). Tests skip without it::

    pytestmark = pytest.mark.skipif(not postgres_url(), reason="MEDSEG_TEST_POSTGRES is not set")

    url = fresh_database("optuna")  # a new, empty database; usable as Optuna or MLflow storage
    try: ...
    finally: drop_database(url)
"""

from __future__ import annotations

import os
import re
import uuid

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

ENV_VAR = "MEDSEG_TEST_POSTGRES"


def postgres_url() -> str | None:
    """The server's URL base from `MEDSEG_TEST_POSTGRES`, or None when unset or empty."""
    return os.environ.get(ENV_VAR) or None


def _admin_engine(url: str) -> sa.Engine:
    """An AUTOCOMMIT engine on the maintenance database ``postgres`` (CREATE/DROP DATABASE refuse transactions)."""
    admin = sa.make_url(url).set(database="postgres")
    return sa.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def fresh_database(name_prefix: str) -> str:
    """Create a new, uniquely named database and return its full URL (password included)."""
    base = postgres_url()
    if base is None:
        raise RuntimeError(f"{ENV_VAR} is not set: skip the test (pytest.skip) before asking for a database")
    prefix = re.sub(r"[^a-z0-9_]+", "_", name_prefix.lower())[:40] or "db"
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    engine = _admin_engine(base)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return sa.make_url(base).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop the database that `url` names, closing any connection still open to it; no error if it is gone."""
    name = sa.make_url(url).database
    if not name or name == "postgres":
        raise ValueError(f"refusing to drop database {name!r}")
    quoted = name.replace('"', '""')
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{quoted}" WITH (FORCE)'))
    finally:
        engine.dispose()
