"""What kind of change a journal entry records, for the code that must tell them apart."""

from __future__ import annotations

from enum import Enum

# Every migration's journal reason starts with this. Journals written before entries had
# a kind are classified by it, once, when the kind column is added (adapters.journal).
MIGRATION_REASON = "migrated varstore"


class ChangeKind(Enum):
    """`undo` must know a migration (its XML change undone alone would point old code at a
    varstore of another layout); every other redefinition is an edit."""

    EDIT = "edit"
    MIGRATION = "migration"
