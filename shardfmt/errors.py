"""Every error shardfmt raises on purpose, under one root, so callers catch one family (and the
CLI, `python -m shardfmt`, catches only these: anything else is a bug and keeps its traceback).

    ShardfmtError                               exit code (`exit_code`)
      DatasetNotFoundError    a path names no dataset (no directory, no         2
                              PREFIX.idx/.bin pair)
      IncompleteDatasetError  a dataset directory without its manifest (the     2
                              write never finished)
      CorruptShardError       bytes that disagree with a header, an index or    1
                              a manifest (shardfmt shards and Megatron .bin/.idx
                              pairs alike): the data failed its checks
      MixSpecError            a weighted `0.7 A 0.3 B` data mix that cannot     2
                              be read one way only
      ConfigFileError         a --config YAML file that is missing or holds a   2
                              key/value no flag accepts
      UsageError              an argument that cannot work (a --dtype too       2
                              narrow, parts that do not belong together)
      OutputExistsError       the output already holds a dataset; --overwrite   2
                              replaces it

Each also subclasses the builtin it used to be (FileNotFoundError / ValueError /
FileExistsError), so older `except ValueError:` code keeps working. Every message names the file
or flag and the fix.
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


class ConfigFileError(ShardfmtError, ValueError):
    """The --config file is missing, not a mapping, or has a key/value no flag accepts."""


class UsageError(ShardfmtError, ValueError):
    """An argument that cannot work with this data; the message names the flag and the fix."""


class OutputExistsError(ShardfmtError, FileExistsError):
    """The output path already holds a dataset (or other files); --overwrite replaces it."""


EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def exit_code(err: ShardfmtError) -> int:
    """1 when the data failed its checks (corrupt), else 2 (bad input or usage)."""
    return EXIT_RUN_FAILED if isinstance(err, CorruptShardError) else EXIT_BAD_INPUT
