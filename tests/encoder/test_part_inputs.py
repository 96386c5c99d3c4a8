"""Part-aware plugins (encoder/input_files.py + the example plugins): the parts joined in order
equal the whole input, part k reads about 1/N of the bytes (measured by the kernel's read
counter), and the same plugins read s3:// URLs from a local S3 server (moto) and gs:// URLs from
a local GCS server (gcp-storage-emulator, which gcsfs finds through STORAGE_EMULATOR_HOST), both
on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encoder_testlib import PLUGINS
from encoder.plugins import iter_part, load_plugin

N = 4


def rows_of(plugin: str, kwargs: dict, part: tuple[int, int] | None = None) -> list:
    return [r for _, r in iter_part(load_plugin(str(PLUGINS / plugin)), kwargs, part=part)]


def joined_parts(plugin: str, kwargs: dict, n: int) -> list:
    return [r for i in range(n) for r in rows_of(plugin, kwargs, (i, n))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """~3 MB each of JSONL text, alpaca JSONL and sharegpt JSONL, plus awkward text files."""
    d = tmp_path_factory.mktemp("corpus")
    files = {"text": d / "docs.jsonl", "alpaca": d / "alpaca.jsonl", "sharegpt": d / "chat.jsonl"}
    with open(files["text"], "w") as f:
        for i in range(6000):
            f.write(json.dumps({"text": f"document {i} " + "word " * (i % 200 + 10)}) + "\n")
    with open(files["alpaca"], "w") as f:
        for i in range(6000):
            f.write(json.dumps({"instruction": f"Task {i}: " + "explain " * (i % 90 + 5),
                                "input": "x" * (i % 7), "output": f"Answer {i}."}) + "\n")
    with open(files["sharegpt"], "w") as f:
        for i in range(6000):
            f.write(json.dumps({"conversations": [
                {"from": "human", "value": f"Question {i} " + "why " * (i % 80 + 3)},
                {"from": "gpt", "value": f"Because {i}."}]}) + "\n")
    # paragraphs with CRLF, runs of empty lines, whitespace-only lines, no final newline
    files["paras"] = d / "paras.txt"
    files["paras"].write_bytes(b"".join(
        (b"para %d line a\r\npara %d line b\n" % (i, i)) + b"\n" * (1 + i % 3)
        + (b"   \n" if i % 5 == 0 else b"") for i in range(700)) + b"last paragraph")
    files["lines"] = d / "lines.txt"
    files["lines"].write_bytes(b"".join(b"line %d\r\n" % i + b"\n" * (i % 2) for i in range(900)))
    return files


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_text_parts_join_to_the_whole(corpus, n):
    cases = [{"path": str(corpus["text"])}, {"path": str(corpus["paras"])},
             {"path": str(corpus["lines"]), "split": "line"},
             {"path": f"{corpus['paras']},{corpus['text']},{corpus['lines']}", "split": "line"},
             {"path": f"{corpus['paras']},{corpus['lines']}"},
             {"path": f"{corpus['paras']},{corpus['lines']}", "split": "file"}]
    for kwargs in cases:
        whole = rows_of("text.py", kwargs)
        assert whole and joined_parts("text.py", kwargs, n) == whole, kwargs


def test_text_paragraphs_are_what_they_look_like(corpus):
    paras = rows_of("text.py", {"path": str(corpus["paras"])})
    assert paras[0] == "para 0 line a\npara 0 line b" and paras[-1] == "last paragraph"
    assert len(paras) == 701 and all("\r" not in p for p in paras)


@pytest.mark.parametrize("plugin,name,kwargs", [("alpaca.py", "alpaca", {}),
                                                 ("sharegpt.py", "sharegpt", {}),
                                                 ("text.py", "text", {})])
def test_jsonl_parts_join_and_read_a_quarter(corpus, plugin, name, kwargs):
    """Part k of 4 reads ~1/4 of the bytes: /proc/self/io rchar (bytes the process read) counted
    around each part's iteration, independent of how the plugin opens files."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux /proc/self/io to count bytes read")
    path = corpus[name]
    size = path.stat().st_size
    kw = {"path": str(path), **kwargs}
    whole = rows_of(plugin, kw)
    plugin_obj = load_plugin(str(PLUGINS / plugin))   # imported before counting
    joined, reads = [], []
    for i in range(N):
        before = read_bytes_so_far()
        joined += [r for _, r in iter_part(plugin_obj, kw, part=(i, N))]
        reads.append(read_bytes_so_far() - before)
    assert joined == whole
    for i, got in enumerate(reads):   # a quarter, + one buffer of over-read at the range's end
        assert 0.9 * size / N <= got <= size / N + 256 * 1024, (i, got, size)
    print(f"{plugin}: {size:,} bytes, parts read {[f'{r / size:.3f}' for r in reads]} of it")


def read_bytes_so_far() -> int:
    with open("/proc/self/io") as f:
        counters = dict(line.split(": ") for line in f.read().splitlines())
    return int(counters["rchar"])


def test_json_arrays_are_sliced_by_record_and_legacy_part_keyword(tmp_path, write_plugin):
    path = PLUGINS / "sample_alpaca.json"
    whole = rows_of("alpaca.py", {"path": f"{path},{path}"})
    assert joined_parts("alpaca.py", {"path": f"{path},{path}"}, 3) == whole
    legacy = write_plugin(code="def data_loader(part=None, num_parts=None):\n"
                               "    yield from [f'{part}/{num_parts}']\n", name="legacy.py")
    assert [r for _, r in iter_part(load_plugin(legacy), {}, part=(1, 3))] == ["1/3"]


def test_input_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(Exception, match=r"bad.jsonl: line at byte 15: not valid JSON"):
        rows_of("text.py", {"path": str(bad)})
    with pytest.raises(Exception, match=r"matches no file"):
        rows_of("text.py", {"path": str(tmp_path / "*.nothing")})


# -- object storage: moto's S3 server on 127.0.0.1 ----------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_server(argv: list[str], port: int, name: str):
    """Start a test server on 127.0.0.1:`port`; yields once it accepts connections, and is
    stopped (by pid) even if a test fails."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start")
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3_server():
    """moto_server on 127.0.0.1:PORT for this module."""
    pytest.importorskip("moto.server", reason="moto[server] not installed (pip install 'moto[server]')")
    pytest.importorskip("s3fs", reason="s3fs not installed (pip install 'llm-shards[distributed]')")
    port = free_port()
    for _ in local_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          port, "moto_server"):
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def gcs_server():
    """gcp-storage-emulator (in memory, bucket `corpus`) on 127.0.0.1:PORT for this module."""
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator not installed (pip "
                        "install gcp-storage-emulator; it is in the dev extra)")
    pytest.importorskip("gcsfs", reason="gcsfs not installed (pip install 'llm-shards[distributed]')")
    port = free_port()
    for _ in local_server([sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1",
                           "--port", str(port), "--in-memory", "--default-bucket", "corpus", "-q"],
                          port, "gcp-storage-emulator"):
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


@pytest.fixture(scope="module")
def small_corpus(corpus) -> dict[str, Path]:
    """The first 400 lines of each file: enough for 3 parts, fast over HTTP."""
    small = {}
    for name in ("text", "alpaca", "sharegpt", "paras"):
        small[name] = corpus[name].with_name("small-" + corpus[name].name)
        small[name].write_bytes(b"".join(corpus[name].read_bytes().splitlines(True)[:400]))
    small["alpaca_array"] = PLUGINS / "sample_alpaca.json"
    return small


UPLOADS = {"text": "c/docs-0.jsonl", "alpaca": "c/alpaca.jsonl", "sharegpt": "c/chat.jsonl",
           "paras": "c/paras.txt", "alpaca_array": "c/alpaca_array.json"}


def check_remote_reads(scheme: str, small: dict[str, Path]) -> None:
    """Every example plugin reads `scheme`://corpus/... (uploaded from `small` as UPLOADS) as it
    reads the local file, whole and in 3 parts; a glob matching nothing names itself."""
    url = f"{scheme}://corpus/"
    cases = [("text.py", {"path": url + "c/docs-*.jsonl"}, "text"),
             ("text.py", {"path": url + UPLOADS["paras"]}, "paras"),
             ("alpaca.py", {"path": url + UPLOADS["alpaca"]}, "alpaca"),
             ("alpaca.py", {"path": url + UPLOADS["alpaca_array"]}, "alpaca_array"),
             ("sharegpt.py", {"path": url + UPLOADS["sharegpt"]}, "sharegpt")]
    for plugin, remote, name in cases:
        whole = rows_of(plugin, {"path": str(small[name])})
        assert whole and rows_of(plugin, remote) == whole, remote
        assert joined_parts(plugin, remote, 3) == whole, remote
    with pytest.raises(Exception, match="matches no file"):
        rows_of("text.py", {"path": url + "nothing/*.jsonl"})


def test_example_plugins_read_s3_urls(s3_server, small_corpus, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="corpus")
    for name, key in UPLOADS.items():
        s3.upload_file(str(small_corpus[name]), "corpus", key)
    check_remote_reads("s3", small_corpus)


def test_example_plugins_read_gs_urls(gcs_server, small_corpus, monkeypatch):
    for key, value in gcs_server.items():
        monkeypatch.setenv(key, value)  # gcsfs: this endpoint, anonymous (no credentials needed)
    import fsspec
    gcs = fsspec.filesystem("gs", skip_instance_cache=True)  # uploaded with the user's client
    for name, key in UPLOADS.items():
        gcs.put_file(str(small_corpus[name]), f"corpus/{key}")
    check_remote_reads("gs", small_corpus)


def test_urls_needing_a_missing_package_or_unknown_say_what_to_do():
    from encoder.input_files import open_binary
    with pytest.raises(ValueError, match=r"Protocol not known.*s3://, gs://"):
        open_binary("nosuchproto://bucket/x.jsonl")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"gcsfs.*llm-shards\[distributed\]"):
            open_binary("gs://bucket/x.jsonl")
