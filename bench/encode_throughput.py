"""Encode throughput: `encoder/main.py` end to end vs the gigatoken ceiling, the raw HF tokenizer, a Megatron-style pipeline and HF `datasets.map`, on the same texts.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encode_throughput.py --replicate 2 --repeats 3 --more_workers_on all

Cases: qa (alpaca en+zh through encoder/user_data_loader/alpaca.py, template none, --merge_data)
and pretrain (c4 + tinyshakespeare paragraphs through text.py), each with llama2 and qwen3;
`--replicate N` adds N-1 distinct copies of the files (see `distinct_copy`: plain repeats would
be served from the tokenizer's cache); N=2 (default) is ~1M tokens per case. The large-corpus
target (pretrain end to end on >= 100 MB) is the same script with `--replicate 54 --cases pretrain
--baselines gigatoken` (~100 MB of text, 31.5M llama2 tokens), and the peak-RSS target (<= 1.5 GB
on a 2 GB corpus) `--replicate 1080 --cases pretrain --tokenizers llama2 --workers 1
--baselines none --repeats 1 --out /tmp/enc2g` (2.0 GB of copies, 640M tokens, 1.3 GB of shards:
delete the --out directory afterwards). `--startup 200 --repeats 15 --before DIR` times start-up
alone (ours with a warm start-up cache, with LLM_ENCODE_CACHE=off, and DIR's encoder) on 200 c4
documents.

Every method is reported two ways:
  * wall: what a user waits for, process start to output done: interpreter, imports, tokenizer
    load, reading, tokenizing, writing. Ours is the whole `python encoder/main.py` subprocess.
    A baseline's wall = its interpreter start + its imports (transformers for all but the
    gigatoken and tokenizers rows; + megatron-core or datasets) + tokenizer load + its run, each
    timed in the baselines' child process.
  * steady: after set-up. Ours = the encoder's own tok/s (plugin + encode + pack + write, as
    printed in its summary); a baseline's = its run alone.
Start-up (ours: interpreter + imports + tokenizer load + engine choice, from the encoder's
set-up line, with its parts: imports, tokenizer load, first batch read, engine build,
calibration; gigatoken's and tokenizers' load) is printed on its own line per case.
Methods:
  ours: `python encoder/main.py ...` (default --tokenizer_backend auto: gigatoken when verified),
      shards written, --num_workers 1 and 2 (gigatoken pool threads). Its start-up cache
      (encoder/verdict_cache.py) lives in --out and is filled by one untimed run per case first,
      so these rows are what every run after the first costs; `--cache_off_rows` adds rows with
      LLM_ENCODE_CACHE=off (a first run: full calibration, vocab hash computed).
  (g) gigatoken: `gigatoken.Tokenizer(tokenizers_obj).encode_batch_list(batch of 8192 strings)`
      over the strings the encoder tokenizes, in memory, nothing written, default thread pool
      (all cores): the ceiling the targets divide by (issue 12).
  (a) raw: `tokenizer(batch, add_special_tokens=False)` (transformers), batches of 1024 strings,
      in memory, nothing written.
  (a') raw-fast: the same strings through `tokenizers.Tokenizer.encode_batch_fast`.
  (b) megatron: `multiprocessing.Pool(ncpu).imap(encode_one, lines, 32)` over a JSONL file, as
      Megatron's tools/preprocess_data.py (json.loads + tokenize per line in the worker; the
      tokenizer is inherited through fork, which spares the workers the load Megatron pays),
      each document added with `IndexedDatasetBuilder.add_document(ids, [len])`, then finalize.
  (c) hf-datasets: `Dataset.from_dict(cols).map(tokenize, batched=True)` (default batch 1000,
      one process), kept in memory as datasets does for an in-memory Dataset.
Every method produces the same token count (BOS iff the tokenizer adds one, text, EOS), except
the raw rows, which have no special tokens; tokens/s below is always the dataset's token count
(stats.json) divided by the method's time, so every ratio is a ratio of times on identical input.
Medians of `--repeats` runs (methods interleaved within each repeat, the machine is shared).
Peak RSS and CPU seconds (user + system, steadier than wall on a shared machine) of ours come
from /usr/bin/time -f "%M %U %S" where present.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
RAW_BATCH = 1024
GIGA_BATCH = 8192   # gigatoken's ceiling: big batches keep its thread pool busy
GLOB_ABOVE = 200    # --replicate above this passes the copies as globs (the 2 GB peak-RSS run)
CASES = {
    "qa": ("alpaca.py", ["alpaca_en_demo.json", "alpaca_zh_demo.json"]),
    "pretrain": ("text.py", ["c4_demo.jsonl", "tinyshakespeare.txt"]),
}


def plugin_args(case: str, shared: Path, replicate: int, out: Path) -> tuple[str, str]:
    """The plugin and its `path=` argument: the data files, then `replicate - 1` distinct copies."""
    plugin, files = CASES[case]
    paths = [shared / "data" / f for f in files]
    for k in range(1, replicate):
        paths += [distinct_copy(shared / "data" / f, k, out / "data") for f in files]
    if replicate > GLOB_ABOVE:   # one argv string holds at most 128 KiB: name the copies by glob
        stems = [Path(f) for f in files]
        return str(ROOT / "encoder" / "user_data_loader" / plugin), ",".join(
            [str(shared / "data" / f) for f in files]
            + [str(out / "data" / f"{f.stem}.copy*{f.suffix}") for f in stems])
    return str(ROOT / "encoder" / "user_data_loader" / plugin), ",".join(map(str, paths))


def distinct_copy(src: Path, k: int, dst_dir: Path) -> Path:
    """Copy k >= 1 of a data file with every text prefixed by "[k] " (alpaca: instruction and
    output; c4: text; tinyshakespeare: each paragraph). Plain repeats would be served from the
    tokenizer's BPE cache (it caches whole pre-tokens, and llama2's pre-token is the whole text),
    which flatters every method and hides the non-tokenizer work; distinct copies do not."""
    dst = dst_dir / f"{src.stem}.copy{k}{src.suffix}"
    if dst.exists():
        return dst
    dst_dir.mkdir(parents=True, exist_ok=True)
    tag = f"[{k}] "
    text = src.read_text(encoding="utf-8")
    if src.suffix == ".json":
        records = [{**r, "instruction": tag + r["instruction"], "output": tag + r["output"]}
                   for r in json.loads(text)]
        body = json.dumps(records, ensure_ascii=False)
    elif src.suffix == ".jsonl":
        body = "".join(json.dumps({**json.loads(line), "text": tag + json.loads(line)["text"]},
                                  ensure_ascii=False) + "\n"
                       for line in text.splitlines() if line.strip())
    else:
        body = "\n\n".join(tag + p if p.strip() else p for p in text.split("\n\n"))
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(dst)
    return dst


def load_rows(case: str, shared: Path, replicate: int, out: Path) -> list:
    """The plugin's rows, exactly as the encoder reads them."""
    from encoder.plugins import load_plugin
    plugin, path = plugin_args(case, shared, replicate, out)
    return list(load_plugin(plugin).fn(path=path))


# -- ours -----------------------------------------------------------------------------------------
def run_ours(case: str, tok: str, workers: int, args: argparse.Namespace,
             root: Path = ROOT, *, cache: str = "warm") -> dict:
    """`python ROOT/encoder/main.py ...` (`root`: this checkout, or --before's). `cache`: "warm"
    = the encoder's start-up cache (encoder/verdict_cache.py) in a directory of this benchmark,
    filled by an untimed run first; "off" = LLM_ENCODE_CACHE=off (a first run on a machine)."""
    plugin, path = plugin_args(case, Path(args.shared), args.replicate, Path(args.out))
    if getattr(args, "startup_path", None):   # --startup: a small slice of c4 instead
        path = args.startup_path
    out = Path(args.out) / ("ours" if root == ROOT else "before")
    name = f"{case}_{tok}_w{workers}"
    cmd = [sys.executable, str(root / "encoder" / "main.py"),
           "--tokenizer_path", str(Path(args.shared) / "tokenizers" / tok),
           "--data_loader_path", plugin, "--data_loader_args", f"path={path}",
           "--encode_type", case, "--max_length", str(args.max_length),
           "--output_path", str(out), "--corpus_name", name, "--overwrite",
           "--num_workers", str(workers)] + (["--merge_data"] if case == "qa" else [])
    env = {**os.environ, "LLM_ENCODE_CACHE": "off" if cache == "off"
           else str(Path(args.out) / "encoder_cache")}
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M CPU_S %U %S"] + cmd
                         if Path("/usr/bin/time").exists() else cmd,
                         capture_output=True, text=True, cwd=root, env=env)
    wall = time.perf_counter() - t0
    rss = re.search(r"MAXRSS_KB (\d+)", res.stderr)
    peak_rss_mb = int(rss.group(1)) / 1024 if rss else float("nan")
    # CPU seconds (user + system) of the whole process: steadier than wall on a shared machine
    cpu = re.search(r"CPU_S ([\d.]+) ([\d.]+)", res.stderr)
    cpu_s = float(cpu.group(1)) + float(cpu.group(2)) if cpu else float("nan")
    if res.returncode != 0:
        raise RuntimeError(f"encoder failed ({res.returncode}): {' '.join(cmd)}\n"
                           f"{res.stderr[-3000:]}")
    stats = json.loads((out / name / "stats.json").read_text())
    m = re.search(r"\(([\d,]+) tok/s over", res.stdout)
    setup = re.search(r"\(([\d.]+)s since start", res.stderr)
    parts = re.search(r"s since start: (.*?)\): ", res.stderr)
    setup_parts = {k: float(v) for k, v in re.findall(r"([^,]+?) ([\d.]+)s(?:,|$)",
                                                       parts.group(1))} if parts else {}
    steady_tps = float(m.group(1).replace(",", "")) if m else float("nan")
    return {"wall_s": wall, "tokens": stats["tokens"], "steady_s": stats["tokens"] / steady_tps,
            "backend": stats.get("tokenizer_backend", {}).get("name"), "peak_rss_mb": peak_rss_mb,
            "cpu_s": cpu_s,
            "setup_s": float(setup.group(1)) if setup else float("nan"),
            "setup_parts": {k.strip(): v for k, v in setup_parts.items()},
            "fill": stats["fill"], "samples": stats["samples"], "rows": stats["rows"]}


# -- baselines (run in a child process: --_baselines) ------------------------------------------
_MEGATRON_TOK = None
_MEGATRON_SPEC = None


def _encode_one(line: str):
    """Megatron's Encoder.encode: json.loads + tokenize one document (+ BOS/EOS as ours)."""
    row = json.loads(line)
    prefix, eos, case = _MEGATRON_SPEC
    if case == "qa":
        ids = (prefix + _MEGATRON_TOK(row["q"], add_special_tokens=False)["input_ids"]
               + _MEGATRON_TOK(row["a"], add_special_tokens=False)["input_ids"] + eos)
    else:
        ids = prefix + _MEGATRON_TOK(row["text"], add_special_tokens=False)["input_ids"] + eos
    return ids, len(line)


def write_jsonl(rows: list, case: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            obj = {"q": r["q"], "a": r["a"]} if case == "qa" else {"text": r}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def run_baselines(case: str, tok_name: str, args: argparse.Namespace) -> dict:
    """Every baseline on one (case, tokenizer): seconds of its run (`s`) and its tokens; the
    tokenizer load times (`load_s`, `load_fast_s`) are returned for the wall numbers."""
    import tokenizers
    from transformers import AutoTokenizer
    from encoder.tokenizer_policy import measure_policy

    shared, out = Path(args.shared), Path(args.out)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(shared / "tokenizers" / tok_name))
    result: dict = {"load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    fast = tokenizers.Tokenizer.from_file(str(shared / "tokenizers" / tok_name / "tokenizer.json"))
    result["load_fast_s"] = time.perf_counter() - t0
    pol = measure_policy(tok)
    prefix, eos = pol.doc_prefix(), [pol.eos_id]
    rows = load_rows(case, shared, args.replicate, out)
    texts = [x for r in rows for x in (r["q"], r["a"])] if case == "qa" else rows
    jsonl = out / f"{case}_x{args.replicate}_distinct.jsonl"
    if not jsonl.exists():
        write_jsonl(rows, case, jsonl)

    wanted = set(args.baselines.split(","))
    for m, _ in BASELINES:
        result[m] = None

    # (b) Megatron-style: fork-inherited tokenizer, imap(chunksize=32), IndexedDatasetBuilder
    if "megatron" in wanted:
        _run_megatron(result, tok, prefix, eos, case, tok_name, jsonl, out)

    # (a) raw ceiling: batched tokenizer calls, nothing else
    if "raw" in wanted:
        t0 = time.perf_counter()
        n_tok = 0
        for k in range(0, len(texts), RAW_BATCH):
            n_tok += sum(map(len, tok(texts[k:k + RAW_BATCH], add_special_tokens=False)["input_ids"]))
        result["raw"] = {"s": time.perf_counter() - t0, "tokens": n_tok}

    # (a') the tokenizers library's fastest batch call (no offsets), nothing else
    if "raw_fast" in wanted:
        t0 = time.perf_counter()
        n_tok = 0
        for k in range(0, len(texts), RAW_BATCH):
            n_tok += sum(len(e.ids) for e in
                         fast.encode_batch_fast(texts[k:k + RAW_BATCH], add_special_tokens=False))
        result["raw_fast"] = {"s": time.perf_counter() - t0, "tokens": n_tok}

    # (g) gigatoken raw ceiling: encode_batch_list over the same strings, its own thread pool
    if "gigatoken" in wanted:
        import gigatoken
        t0 = time.perf_counter()
        giga = gigatoken.Tokenizer(fast)
        result["load_giga_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_tok = 0
        for k in range(0, len(texts), GIGA_BATCH):
            n_tok += sum(map(len, giga.encode_batch_list(texts[k:k + GIGA_BATCH])))
        result["gigatoken"] = {"s": time.perf_counter() - t0, "tokens": n_tok}

    # (c) HF datasets.map(batched=True)
    if "hf" in wanted:
        _run_hf(result, tok, prefix, eos, case, rows)
    return result


def _run_megatron(result: dict, tok, prefix, eos, case: str, tok_name: str, jsonl: Path,
                  out: Path) -> None:
    global _MEGATRON_TOK, _MEGATRON_SPEC
    import multiprocessing as mp
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    _MEGATRON_TOK, _MEGATRON_SPEC = tok, (prefix, eos, case)
    prefix_path = out / "megatron" / f"{case}_{tok_name}"
    prefix_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tok) < 65500 else np.int32
    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(str(prefix_path) + ".bin", dtype=dtype)
    n_tok = 0
    with open(jsonl, encoding="utf-8") as fin, mp.get_context("fork").Pool(os.cpu_count()) as pool:
        for ids, _ in pool.imap(_encode_one, fin, 32):
            builder.add_document(ids, [len(ids)])
            n_tok += len(ids)
    builder.finalize(str(prefix_path) + ".idx")
    result["megatron"] = {"s": time.perf_counter() - t0, "tokens": n_tok}


def _run_hf(result: dict, tok, prefix, eos, case: str, rows: list) -> None:
    try:
        import datasets
    except ImportError:
        result["hf"] = None
    else:
        datasets.disable_progress_bars()
        if case == "qa":
            cols = {"q": [r["q"] for r in rows], "a": [r["a"] for r in rows]}

            def fn(batch):
                q = tok(batch["q"], add_special_tokens=False)["input_ids"]
                a = tok(batch["a"], add_special_tokens=False)["input_ids"]
                return {"input_ids": [prefix + x + y + eos for x, y in zip(q, a)]}
        else:
            cols = {"text": rows}

            def fn(batch):
                return {"input_ids": [prefix + x + eos for x in
                                      tok(batch["text"], add_special_tokens=False)["input_ids"]]}
        t0 = time.perf_counter()
        ds = datasets.Dataset.from_dict(cols).map(fn, batched=True, remove_columns=list(cols))
        elapsed = time.perf_counter() - t0
        n_tok = int(sum(len(x) for x in ds["input_ids"]))
        result["hf"] = {"s": elapsed, "tokens": n_tok}


def baselines_child(combos: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """All baselines in this process; each one's wall = interpreter start + the imports it needs
    + its tokenizer load + its run (imports timed once, in dependency order)."""
    startup = {"interpreter": time.time() - float(os.environ["BENCH_LAUNCH"])}
    for name, stmt in (("tokenizers", "import tokenizers"), ("gigatoken", "import gigatoken"),
                       ("transformers", "from transformers import AutoTokenizer"),
                       ("megatron", "import megatron.core.datasets.indexed_dataset"),
                       ("datasets", "import datasets")):
        t0 = time.perf_counter()
        try:
            exec(stmt)
        except ImportError:
            pass
        startup[name] = time.perf_counter() - t0
    cases = {}
    for c, t in combos:
        r = run_baselines(c, t, args)
        common = startup["interpreter"] + startup["tokenizers"] + startup["transformers"] \
            + r["load_s"]
        if r["raw"] is not None:
            r["raw"]["wall"] = common + r["raw"]["s"]
        if r["raw_fast"] is not None:
            r["raw_fast"]["wall"] = startup["interpreter"] + startup["tokenizers"] \
                + r["load_fast_s"] + r["raw_fast"]["s"]
        if r["megatron"] is not None:
            r["megatron"]["wall"] = common + startup["megatron"] + r["megatron"]["s"]
        if r["hf"] is not None:
            r["hf"]["wall"] = common + startup["datasets"] + r["hf"]["s"]
        if r["gigatoken"] is not None:
            r["gigatoken"]["wall"] = startup["interpreter"] + startup["tokenizers"] \
                + startup["gigatoken"] + r["load_fast_s"] + r["load_giga_s"] + r["gigatoken"]["s"]
        cases[f"{c}/{t}"] = r
    return {"startup": startup, "cases": cases}


# -- start-up only (--startup N) ------------------------------------------------------------------
def startup_runs(args: argparse.Namespace) -> None:
    """`python encoder/main.py --encode_type pretrain` on the first N c4 documents (a run that is
    nearly all start-up), per tokenizer: ours with a warm start-up cache, ours with
    LLM_ENCODE_CACHE=off (a first run) and --before's encoder, interleaved, `--repeats` times.
    Prints medians of wall, CPU (user + system) and the set-up line's parts."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = out / f"c4_first{args.startup}.jsonl"
    with open(Path(args.shared) / "data" / "c4_demo.jsonl", encoding="utf-8") as f:
        small.write_text("".join(line for _, line in zip(range(args.startup), f)),
                         encoding="utf-8")
    args.startup_path = str(small)
    variants = [("ours (cache warm)", ROOT, "warm"), ("ours, LLM_ENCODE_CACHE=off", ROOT, "off")]
    if args.before:
        variants.append((f"before ({args.before})", Path(args.before).resolve(), "warm"))
    toks = args.tokenizers.split(",")
    runs = {(t, v[0]): [] for t in toks for v in variants}
    t_start = time.perf_counter()
    for tok in toks:
        run_ours("pretrain", tok, 1, args)   # fills the cache (untimed)
    for _ in range(args.repeats):
        for tok in toks:
            for label, root, cache in variants:
                runs[(tok, label)].append(run_ours("pretrain", tok, 1, args, root=root,
                                                   cache=cache))
    med = statistics.median
    print(f"start-up: `encoder/main.py --encode_type pretrain --num_workers 1` on the first "
          f"{args.startup} c4 documents; medians of {args.repeats} interleaved runs; "
          f"{os.cpu_count()} CPUs; load average at the end {os.getloadavg()[0]:.1f}; this took "
          f"{time.perf_counter() - t_start:.0f}s.\n")
    print("| tokenizer | encoder | wall s | CPU s | set-up s | set-up parts |\n"
          "|---|---|---:|---:|---:|---|")
    for (tok, label), rs in runs.items():
        parts = rs[0]["setup_parts"]
        print(f"| {tok} | {label} | {med(r['wall_s'] for r in rs):.2f} | "
              f"{med(r['cpu_s'] for r in rs):.2f} | {med(r['setup_s'] for r in rs):.2f} | "
              + ", ".join(f"{k} {med(r['setup_parts'].get(k, float('nan')) for r in rs):.2f}s"
                          for k in parts) + " |")


# -- driver ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--replicate", type=int, default=2, help="the data files + N-1 distinct copies")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizers", default="llama2,qwen3")
    ap.add_argument("--cases", default="qa,pretrain")
    ap.add_argument("--workers", default="1,2", help="--num_workers values for ours")
    ap.add_argument("--more_workers_on", default="qa/llama2",
                    help="cases that also run the 2nd.. --workers values (the first value runs on "
                         "every case); 'all' for every case")
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--baselines", default="raw,gigatoken,raw_fast,megatron,hf",
                    help="baselines to run (the large-corpus run: gigatoken,megatron); 'none': "
                         "ours only")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "encode"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--before", help="another checkout's root (e.g. `git archive main encoder "
                    "shardfmt | tar -x -C /tmp/before`): its encoder runs too, interleaved, as "
                    "the 'before' rows (before/after a change, both sides in the same run)")
    ap.add_argument("--cache_off_rows", action="store_true",
                    help="also run ours with LLM_ENCODE_CACHE=off (what a first run on a machine "
                         "costs: full calibration, vocab hash computed), interleaved")
    ap.add_argument("--startup", type=int, default=0, metavar="N",
                    help="start-up only: ours (warm cache, cache off) and --before on the first N "
                         "c4 documents, --repeats interleaved runs per tokenizer (no baselines)")
    ap.add_argument("--_baselines", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    combos = [(c, t) for c in args.cases.split(",") for t in args.tokenizers.split(",")]
    if args._baselines:  # child: every (case, tokenizer), imports paid once
        print(json.dumps(baselines_child(combos, args)))
        return
    if not (Path(args.shared) / "tokenizers").is_dir():
        print(f"skip: {args.shared}/tokenizers not found (encode benchmark needs ../shared)")
        return
    if args.startup:
        startup_runs(args)
        return
    workers = [int(w) for w in args.workers.split(",")]
    more = {f"{c}/{t}" for c, t in combos} if args.more_workers_on == "all" \
        else set(args.more_workers_on.split(","))
    runs: dict = {f"{c}/{t}": {"ours": {w: [] for w in (workers if f"{c}/{t}" in more
                                                        else workers[:1])}, "base": []}
                  for c, t in combos}
    t_start = time.perf_counter()
    startups: list[dict] = []
    # fill the encoder's start-up cache (untimed, on the data files alone: the cache depends on
    # the tokenizer only), so every timed run of ours is warm, as every run after a user's first
    warm_args = argparse.Namespace(**{**vars(args), "replicate": 1})
    for case, tok in combos:
        run_ours(case, tok, workers[0], warm_args)
    for rep in range(args.repeats):
        for case, tok in combos:
            for w, results in runs[f"{case}/{tok}"]["ours"].items():
                results.append(run_ours(case, tok, w, args))
                if args.cache_off_rows:
                    runs[f"{case}/{tok}"].setdefault("cache off", {}).setdefault(w, []).append(
                        run_ours(case, tok, w, args, cache="off"))
                if args.before:
                    runs[f"{case}/{tok}"].setdefault("before", {}).setdefault(w, []).append(
                        run_ours(case, tok, w, args, root=Path(args.before).resolve()))
        if args.baselines == "none":   # ours only (the 2 GB peak-RSS run)
            for key in runs:
                runs[key]["base"].append({m: None for m, _ in BASELINES})
            continue
        res = subprocess.run([sys.executable, __file__, "--_baselines", "--cases", args.cases,
                              "--tokenizers", args.tokenizers, "--replicate", str(args.replicate),
                              "--shared", args.shared, "--out", args.out,
                              "--baselines", args.baselines],
                             capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "BENCH_LAUNCH": repr(time.time())})
        if res.returncode != 0:
            raise RuntimeError(f"baselines failed: {res.stderr[-3000:]}")
        child = json.loads(res.stdout.strip().splitlines()[-1])
        startups.append(child["startup"])
        for key, val in child["cases"].items():
            runs[key]["base"].append(val)
        print(f"repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f}s)",
              file=sys.stderr)
    report(runs, workers, args, startups=startups, total_s=time.perf_counter() - t_start)


BASELINES = (("raw", "(a) raw tokenizer(batch), nothing written"),
             ("gigatoken", "(g) gigatoken encode_batch_list, nothing written (the ceiling)"),
             ("raw_fast", "(a') tokenizers encode_batch_fast, nothing written"),
             ("megatron", "(b) megatron Pool.imap(32) + IndexedDatasetBuilder"),
             ("hf", "(c) HF datasets.map(batched=True)"))


def report(runs: dict, workers: list[int], args, *, startups: list[dict], total_s: float) -> None:
    med = statistics.median
    summary, results, startup_lines = [], {}, []
    rows_of = {key.split("/")[0]: next(iter(r["ours"].values()))[0]["rows"]
               for key, r in runs.items()}
    names = {"qa": "alpaca en+zh records", "pretrain": "c4 docs + tinyshakespeare paragraphs"}
    up = {k: med(s[k] for s in startups) for k in startups[0]} if startups else {}
    print(f"data: the files + {args.replicate - 1} distinct copies: "
          + "; ".join(f"{c}: {n:,} {names[c]}" for c, n in rows_of.items())
          + f"; max_length {args.max_length} (qa packed with --merge_data); medians of "
          f"{args.repeats} runs; {os.cpu_count()} CPUs; this benchmark took {total_s:.0f}s.\n\n"
          "steady = after set-up (ours: the encoder's own tok/s over plugin + encode + pack + "
          "write; baselines: their run alone). wall = process start to output done, incl. "
          "interpreter, imports and tokenizer load (ours: the whole `python encoder/main.py`; "
          "baselines: their run + the start-up parts they need, timed in their process: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in up.items())
          + "). Ratio columns: ours tokens/s ÷ that row's tokens/s, steady vs steady and wall vs "
          "wall (> 1: ours faster).\n")
    for key, r in runs.items():
        tokens = next(iter(r["ours"].values()))[0]["tokens"]
        rows = {}   # label -> (steady s, wall s, note)
        for w, o in r["ours"].items():
            rows[f"ours --num_workers {w}"] = (
                med(x["steady_s"] for x in o), med(x["wall_s"] for x in o),
                f"set-up {med(x['setup_s'] for x in o):.1f}s, engine {o[0]['backend']}, "
                f"CPU {med(x.get('cpu_s', float('nan')) for x in o):.2f}s, "
                f"peak RSS {max(x['peak_rss_mb'] for x in o):,.0f} MB")
        for w, o in r.get("cache off", {}).items():
            rows[f"ours --num_workers {w}, LLM_ENCODE_CACHE=off"] = (
                med(x["steady_s"] for x in o), med(x["wall_s"] for x in o),
                f"set-up {med(x['setup_s'] for x in o):.1f}s, engine {o[0]['backend']}, "
                f"CPU {med(x.get('cpu_s', float('nan')) for x in o):.2f}s, "
                f"peak RSS {max(x['peak_rss_mb'] for x in o):,.0f} MB")
        for w, o in r.get("before", {}).items():
            rows[f"before ({args.before}) --num_workers {w}"] = (
                med(x["steady_s"] for x in o), med(x["wall_s"] for x in o),
                f"set-up {med(x['setup_s'] for x in o):.1f}s, "
                f"CPU {med(x.get('cpu_s', float('nan')) for x in o):.2f}s, peak RSS "
                f"{max(x['peak_rss_mb'] for x in o):,.0f} MB"
                + ("" if o[0]["tokens"] == tokens else f", {o[0]['tokens']:,} tokens"))
        base = r["base"]
        for m, label in BASELINES:
            if base[0].get(m) is None:
                rows[label + " — skipped (--baselines, or not installed)"] = (
                    float("nan"), float("nan"), "")
                continue
            note = "" if base[0][m]["tokens"] == tokens else f"{base[0][m]['tokens']:,} tokens"
            rows[label] = (med(b[m]["s"] for b in base), med(b[m]["wall"] for b in base), note)
        ours = f"ours --num_workers {workers[0]}"
        ref_s, ref_w = rows[ours][:2]
        print(f"### {key}: {tokens:,} tokens\n")
        print(f"| method | steady s | steady tok/s | wall s | wall tok/s | {ours} ÷ this, steady "
              f"| ÷ this, wall | note |\n|---|---:|---:|---:|---:|---:|---:|---|")
        for lab, (s_, w_, note) in rows.items():
            print(f"| {lab} | {s_:.2f} | {tokens / s_:,.0f} | {w_:.2f} | {tokens / w_:,.0f} | "
                  f"{s_ / ref_s:.2f} | {w_ / ref_w:.2f} | {note} |")
        print()
        best_s = min(rows[f"ours --num_workers {w}"][0] for w in r["ours"])
        best_w = min(rows[f"ours --num_workers {w}"][1] for w in r["ours"])
        nan2 = (float("nan"), float("nan"))
        giga, meg = rows.get(BASELINES[1][1], nan2), rows.get(BASELINES[3][1], nan2)
        summary.append((key, giga[0] / best_s, giga[1] / best_w, meg[0] / best_s, meg[1] / best_w))
        nan = float("nan")
        for variant in ("ours", "cache off", "before"):
            if variant not in r:
                continue
            # the parts: at the first --workers value
            first = next(iter(r[variant].values()))
            name = {"ours": "ours", "cache off": "ours, LLM_ENCODE_CACHE=off",
                    "before": f"before ({args.before})"}[variant]
            startup_lines.append(
                f"start-up {key}: {name} (interpreter + imports + tokenizer load + engine choice) "
                + ", ".join(f"--num_workers {w} {med(x['setup_s'] for x in o):.2f}s"
                            for w, o in r[variant].items())
                + " (" + ", ".join(
                    f"{k} {med(x['setup_parts'].get(k, nan) for x in first):.2f}s"
                    for k in first[0].get("setup_parts", {})) + ")"
                + ("" if variant != "ours" else
                   f"; gigatoken load {med(b.get('load_giga_s', nan) for b in base):.2f}s"
                   f", tokenizers load {med(b.get('load_fast_s', nan) for b in base):.2f}s"))
        results[key] = {"tokens": tokens, "seconds": {lab: v[:2] for lab, v in rows.items()}}
    for line in startup_lines:
        print(line)
    print("\n### targets (best of ours over --num_workers): ours ÷ gigatoken ceiling "
          "(pretrain ≥ 0.6 steady, ≥ 0.5 wall; qa ≥ 0.4), ours ÷ megatron ≥ 4\n")
    print("| case | ours ÷ gigatoken, steady | ÷ gigatoken, wall | ours ÷ megatron, steady | "
          "÷ megatron, wall |\n|---|---|---|---|---|")
    for key, a_s, a_w, b_s, b_w in summary:
        def mark(x, t):
            return f"{x:.2f} {'✓' if x >= t else '✗'}"
        pretrain = key.startswith("pretrain")
        print(f"| {key} | {mark(a_s, 0.6 if pretrain else 0.4)} | "
              f"{mark(a_w, 0.5 if pretrain else 0.4)} | {mark(b_s, 4)} | {mark(b_w, 4)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_seconds": results, "runs": runs,
                                               "startup": startups, "args": vars(args)},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
