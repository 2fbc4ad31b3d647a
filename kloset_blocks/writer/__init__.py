# Writing Kloset stores, for tests and demos only: the product never writes a store. The reader
# (kloset_blocks.store) is the judge of what is written here, and Kloset's own fixtures the judge
# of the reader.
from __future__ import annotations

from kloset_blocks.writer.store import add_snapshot, open_existing, write_store

__all__ = ["add_snapshot", "open_existing", "write_store"]
