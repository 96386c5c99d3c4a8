"""Every error the encoder raises on purpose, under one root, so its commands catch one family
and anything else (a bug) keeps its traceback.

    EncoderError
      EncoderInputError       exit 2: the flags, files, plugin or rows given are wrong; fix and re-run
        UsageError              a flag, or a combination of flags (ValueError)
        InputNotFoundError      a path given does not exist (FileNotFoundError)
        OutputExistsError       the output already holds a dataset; --overwrite replaces it
                                (FileExistsError)
        OutputNotWritableError  the output path cannot be written (permissions, read-only) (OSError)
        PluginError             the plugin file cannot be imported or called, or raised (RuntimeError)
        RowError                one row the plugin yielded is invalid (ValueError)
        TemplateError           the prompt template does not fit the tokenizer or the row (ValueError)
        BackendError            --tokenizer_backend cannot encode with this tokenizer (ValueError)
      EncoderRunError         exit 1: the inputs were accepted but the run did not complete
        CrossCheckError         the fast engine disagreed with the reference tokenizer
        OutputWriteError        writing the dataset failed (disk full, I/O error); nothing looks
                                complete (no manifest.json)

Each also subclasses the builtin it used to be, so older `except ValueError:` code keeps
working. Every message names the file, row or flag and the fix. `exit_code(err)` is the one
place that maps an error to the exit-code convention (README "Exit codes").
"""

from __future__ import annotations

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class EncoderError(Exception):
    """Root of the encoder's own errors."""


class EncoderInputError(EncoderError):
    """The user's flags, files, plugin or data are wrong (exit 2)."""


class EncoderRunError(EncoderError):
    """The inputs were accepted, but the run failed (exit 1)."""


class UsageError(EncoderInputError, ValueError):
    """A flag, or a combination of flags, that cannot work; the message names the flag(s)."""


class InputNotFoundError(EncoderInputError, FileNotFoundError):
    """A path given on the command line (tokenizer, plugin, pieces file, ...) does not exist."""


class OutputExistsError(EncoderInputError, FileExistsError):
    """The output already holds a dataset (or a non-empty directory); --overwrite replaces it."""


class OutputNotWritableError(EncoderInputError, OSError):
    """The output path cannot be written to (no permission, read-only file system, not a dir)."""


class PluginError(EncoderInputError, RuntimeError):
    """The plugin file cannot be used at all (missing file, no data_loader, it raised)."""


class RowError(EncoderInputError, ValueError):
    """One row is wrong; the message names the plugin file, the row index and the problem."""

    def __init__(self, plugin: str, row: int, problem: str):
        super().__init__(f"{plugin}: row {row}: {problem}")
        self.plugin, self.row, self.problem = plugin, row, problem

    def __reduce__(self):   # keep the three fields across processes (worker pools, ray)
        return type(self), (self.plugin, self.row, self.problem)


class TemplateError(EncoderInputError, ValueError):
    """A prompt template that does not fit the tokenizer or the row."""


class BackendError(EncoderInputError, ValueError):
    """The requested tokenizer engine cannot encode with this tokenizer."""


class CrossCheckError(EncoderRunError, RuntimeError):
    """The engine and the reference gave different ids for a sampled row: the run stops (exit 1)."""

    def __init__(self, row: int, engine: str, ids: list[int], reference: str, ref_ids: list[int]):
        diff = next((k for k, (a, b) in enumerate(zip(ids, ref_ids)) if a != b),
                    min(len(ids), len(ref_ids)))
        super().__init__(
            f"cross-check failed at row {row}: {engine} and {reference} give different ids "
            f"(first difference at position {diff}; {len(ids)} vs {len(ref_ids)} ids). "
            f"{engine} ids: {ids}; {reference} ids: {ref_ids}. Nothing was completed (no "
            f"manifest); re-run with --tokenizer_backend {reference} and report the row to "
            f"the {engine} project")
        self.row, self.engine, self.reference = row, engine, reference
        self.ids, self.ref_ids = ids, ref_ids

    def __reduce__(self):
        return type(self), (self.row, self.engine, self.ids, self.reference, self.ref_ids)


class OutputWriteError(EncoderRunError, OSError):
    """Writing the dataset failed part-way (disk full, I/O error): no manifest.json was written."""


def exit_code(err: EncoderError) -> int:
    """2 for bad input or usage, 1 for a run that failed."""
    return EXIT_BAD_INPUT if isinstance(err, EncoderInputError) else EXIT_RUN_FAILED
