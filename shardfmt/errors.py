"""Every error shardfmt raises on purpose, under one root, so callers catch one family.

    ShardfmtError
      DatasetNotFoundError    a path names no dataset (no directory, no PREFIX.idx/.bin pair)
      IncompleteDatasetError  a dataset directory without its manifest (the write never finished)
      CorruptShardError       bytes that disagree with a header, an index or a manifest
                              (shardfmt shards and Megatron .bin/.idx pairs alike)
      MixSpecError            a weighted `0.7 A 0.3 B` data mix that cannot be read one way only

Each also subclasses the builtin it used to be (FileNotFoundError / ValueError), so older
`except ValueError:` code keeps working. Every message names the file or flag and the fix.
"""

from __future__ import annotations


class ShardfmtError(Exception):
    """Root of shardfmt's own errors."""


class DatasetNotFoundError(ShardfmtError, FileNotFoundError):
    """The path is neither a dataset directory nor a Megatron `.bin/.idx` prefix."""


class IncompleteDatasetError(ShardfmtError, FileNotFoundError):
    """The directory has no manifest: its write never finished (killed, or still running)."""


class CorruptShardError(ShardfmtError, ValueError):
    """A shard's bytes disagree with its header, index or manifest."""


class MixSpecError(ShardfmtError, ValueError):
    """A data-mix specification (`--data_path 0.7 A 0.3 B`) that is malformed or ambiguous."""
