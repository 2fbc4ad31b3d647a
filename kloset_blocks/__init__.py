"""kloset-blocks: run SQL on a PostgreSQL backup kept in a Kloset store, without restoring it."""

__version__ = "0.1.0"
