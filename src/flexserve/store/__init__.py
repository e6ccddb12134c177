"""Storage: the database engine, the schema and its migrations.

``Database.from_url`` takes the plain URL an operator writes
(``sqlite:///path/to/file.db``, ``postgresql://user@host/db``) and picks the
async driver itself; ``Database.migrate`` brings the schema to the newest
Alembic revision. The tables live in ``flexserve.store.schema``.
"""

from __future__ import annotations

from flexserve.store.database import Database

__all__ = ["Database"]
