"""Persistent state behind SQLAlchemy: SQLite by default, PostgreSQL in production."""
from pdserve.store.repository import Store

__all__ = ["Store"]
