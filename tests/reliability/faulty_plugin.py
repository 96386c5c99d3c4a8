"""A data-loader plugin for the fault-injection tests (not a test module).

It yields deterministic QA rows. Environment variables set only by the tests make it stop at a
known point, write a marker file, and sleep, so the test can SIGKILL the encoder there. The hooks
live here, in user code loaded by the encoder; the encoder itself has none.

  RELI_MARK       marker file written when the plugin blocks (its text says where)
  RELI_ROWS       number of rows (default 1500)
  RELI_BLOCK_ROW  block just before yielding this row (during reading/tokenizing/writing)
  RELI_BLOCK_AT   idx_rename      - shard 3's .bin renamed into place, its .idx not yet
                  before_manifest - every shard final, manifest.json not yet written
                  manifest_rename - manifest.json.<pid>.<hex>.tmp written and fsynced, not yet renamed
"""

import os
import time
from pathlib import Path

MARK = os.environ.get("RELI_MARK", "")
BLOCK_ROW = int(os.environ.get("RELI_BLOCK_ROW", "-1"))
BLOCK_AT = os.environ.get("RELI_BLOCK_AT", "")


def _block(where: str) -> None:
    Path(MARK).write_text(where)
    while True:  # the test kills us here
        time.sleep(60)


def _install_writer_hooks() -> None:
    import shardfmt.writer as writer

    real_json = writer.write_json_atomic

    class _OsProxy:  # the writer module's `os`, with a replace() that can block
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            name = os.path.basename(dst)
            if (BLOCK_AT == "idx_rename" and name.endswith("_00003.idx")) or \
                    (BLOCK_AT == "manifest_rename" and name == "manifest.json"):
                _block(f"before rename to {name}")
            return os.replace(src, dst)

    def write_json_atomic(path, obj):
        if BLOCK_AT == "before_manifest" and Path(path).name == "manifest.json":
            _block("before manifest")
        return real_json(path, obj)

    writer.os = _OsProxy()
    writer.write_json_atomic = write_json_atomic


if BLOCK_AT:
    _install_writer_hooks()


def data_loader():
    for i in range(int(os.environ.get("RELI_ROWS", "1500"))):
        if i == BLOCK_ROW:
            _block(f"row {i}")
        yield {"q": f"Question {i}: what is the capital of France?" + " fox" * (i % 7),
               "a": "Paris is the capital." + " dog" * (i % 5)}
