"""Alembic migrations, run in code by ``Database.migrate`` (no alembic.ini).

Add a revision by copying the newest file in ``versions/`` and giving it the
next short id ("0002", "0003", …) with ``down_revision`` set to the previous
one; then mirror the change in ``flexserve.store.schema``.
"""
