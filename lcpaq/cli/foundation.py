"""`lcpaq models`, `lcpaq inspect`, `lcpaq cost` (filled in by the foundation work)."""
