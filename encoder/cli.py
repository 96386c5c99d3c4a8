"""The `llm-encode` / `python encoder/main.py` command line."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, fields

from encoder.packing import DEFAULT_PACK_WINDOW
from shardfmt.run_config import add_config_flag
from encoder.templates import TEMPLATE_NAMES
from encoder.errors import UsageError
from encoder.backends import TOKENIZER_BACKENDS
from encoder.document_encoder import CROSS_CHECK_EVERY
from encoder.tokenizer_policy import SAVE_DTYPES
from encoder.truncation import DEFAULT_TRUNCATION, TRUNCATION_MODES

EPILOG = """\
examples:
  llm-encode --tokenizer_path ../shared/tokenizers/qwen3 --encode_type qa --template chat \\
      --data_loader_path encoder/user_data_loader/alpaca.py \\
      --data_loader_args path=../shared/data/alpaca_en_demo.json \\
      --output_path out --corpus_name alpaca_qwen3 --max_length 2048 --merge_data
  llm-encode ... --analyze        # length statistics only, writes nothing

layout: BOS once per document iff the tokenizer adds one by itself; every answer ends with EOS (or
the template's end-of-turn token, e.g. <|im_end|>) which is trained; prompt/system/user tokens have
loss 0; pad is never stored. The policy is recorded in manifest.json metadata.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-encode", description="Encode a data-loader plugin's rows into shardfmt token "
        "shards (OUTPUT_PATH/CORPUS_NAME/).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flag(p)
    a = p.add_argument
    a("--tokenizer_path", required=True, help="Hugging Face tokenizer directory (loaded offline; "
      "see --tokenizer_backend).")
    a("--tokenizer_backend", choices=TOKENIZER_BACKENDS, default="auto", help="engine that "
      "turns text into ids. auto (default): gigatoken (Rust, ~6x faster) if it loads the "
      "tokenizer and its ids equal the reference on built-in hard strings + your first batch, "
      "else tokenizers (HF tokenizers, what transformers runs), else transformers. An explicit "
      "gigatoken/tokenizers is verified the same way and fails instead of falling back; "
      "transformers also loads with AutoTokenizer (~8 s: imports torch) instead of reading "
      "tokenizer.json directly. Same ids every way; the summary, stats.json and the manifest "
      "say which engine ran and why.")
    a("--cross_check_every", type=int, default=CROSS_CHECK_EVERY, metavar="N", help="re-encode a "
      f"deterministic ~1-in-N sample of rows with the reference backend (default {CROSS_CHECK_EVERY}"
      "; 1 = every row, 0 = off); a difference stops the run (exit 1, no manifest) naming the "
      "row and both id lists.")
    a("--data_loader_path", required=True, help="plugin .py file defining a generator "
      "data_loader(**kwargs); see encoder/user_data_loader/ for examples.")
    a("--data_loader_args", nargs="*", default=[], metavar="KEY=VALUE", help="keyword arguments "
      "for data_loader(), values passed as strings (e.g. path=data.json).")
    a("--corpus_name", help="dataset directory name under --output_path (required unless "
      "--analyze).")
    a("--encode_type", required=True, choices=("pretrain", "qa", "chat", "preference", "kto"),
      help="pretrain: plugin "
      "yields str, documents are concatenated and cut into max_length samples; qa: yields "
      "{'q','a'[,'system']}; chat: yields {'messages': [{'role','content'}, ...]}; preference: "
      "yields {'prompt','chosen','rejected'[,'system']} or {'messages','chosen','rejected'} "
      "(DPO pairs; each side formatted as qa/chat, --max_length bounds each side, a pair is "
      "kept or dropped whole, --merge_data packs whole pairs; see encoder/preference.py); kto: yields {'prompt', "
      "'completion', 'label': bool} or {'messages' (last = the assistant completion), 'label'} "
      "(unpaired feedback for --objective kto; the label is stored per sequence).")
    a("--output_path", help="parent directory of the dataset (required unless --analyze).")
    a("--max_length", type=int, required=True, help="maximum tokens per training sample.")
    a("--template", choices=TEMPLATE_NAMES, default=None, help="prompt format for qa/chat: none "
      "(q/a verbatim: prompt = q tokens, answer = a tokens + EOS), chat (the tokenizer's "
      "chat_template), alpaca, chatml (needs <|im_start|>/<|im_end|> tokens), llama2. Default: "
      "none for qa, chat for chat. Ignored for pretrain.")
    a("--chat_template", default=None, metavar="FILE|chatml_tools", help="--template chat: render "
      "with this jinja chat template instead of the tokenizer's own (needed when the tokenizer "
      "has none, e.g. tests/encoder/fixtures/llama31_tool_chat_template.jinja for Llama-3.1 tool "
      "calls), or the built-in chatml_tools (ChatML + Hermes-style <tools>/<tool_call>/"
      "<tool_response>; needs <|im_start|>/<|im_end|> tokens). Implies --template chat.")
    a("--truncation", choices=TRUNCATION_MODES, default=DEFAULT_TRUNCATION, help="qa/chat samples "
      "longer than max_length: drop (default, safest), right (cut the end; the answer may lose its "
      "EOS), prompt_left (cut the start of the prompt, keep BOS; drop if the answers alone do not "
      "fit). Each case is counted in the summary and stats.json.")
    a("--merge_data", action="store_true", help="qa/chat: pack several samples into each "
      "max_length sequence with best-fit-decreasing (deterministic). Pretrain is always "
      "concatenated, so it ignores this flag.")
    a("--pack_window", type=int, default=DEFAULT_PACK_WINDOW, help="--merge_data packs within "
      f"consecutive windows of this many samples (memory bound; default {DEFAULT_PACK_WINDOW}).")
    a("--drop_remainder", action="store_true", help="pretrain: drop the final partial sample "
      "(shorter than max_length) instead of keeping it. Its size is reported either way.")
    a("--save_dtype", choices=SAVE_DTYPES, default="auto", help="token dtype of the shards; auto "
      "= smallest that holds len(tokenizer) incl. added tokens (uint16 up to 65536 tokens, else "
      "int32). A too-small dtype fails before tokenizing.")
    a("--tokens_per_file", type=float, default=5e8, help="tokens per shard file (default 5e8).")
    a("--num_workers", type=int, default=None, help="tokenizer parallelism. gigatoken: threads "
      "of its pool (default: all cores); tokenizers/transformers: worker processes (default 1 = "
      "in-process). Output is byte-identical for any value.")
    a("--add_tokens", nargs="+", default=[], metavar="TOKEN", help="special tokens to add to the "
      "tokenizer before encoding; the modified tokenizer is saved to the dataset's tokenizer/ "
      "directory and the manifest lists the tokens and ids. Being special, they are never made "
      "from data text (the template inserts them); for new tokens recognised in data, extend the "
      "vocabulary with `python -m encoder.tokenizer extend --pieces FILE`.")
    a("--overwrite", action="store_true", help="replace an existing dataset at "
      "OUTPUT_PATH/CORPUS_NAME (refused otherwise). The new one is written beside it and swapped "
      "in when complete; a failed or killed run leaves the old one intact.")
    a("--skip_invalid", action="store_true", help="skip wrong rows (wrong type, missing key, "
      "empty answer) instead of stopping; the count and the first reasons are reported.")
    a("--analyze", action="store_true", help="tokenize and print length statistics (percentiles, "
      "over-length counts, packing fill) to help choose --max_length; writes nothing.")
    a("--plot", action="store_true", help="also write a document-length histogram PNG "
      "(CORPUS_NAME/lengths.png); not with --analyze.")
    a("--part", default=None, metavar="I/N", help="encode only part I of N (0 <= I < N): the "
      "contiguous slice of rows [I*R//N, (I+1)*R//N) of the plugin's R rows (one extra counting "
      "pass), or, if data_loader accepts part= and num_parts=, whatever the plugin yields for "
      "them. Merge parts with `python -m shardfmt merge`.")
    return p


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`"1/4"` -> `(1, 4)`.

    >>> parse_part("0/2")
    (0, 2)
    """
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UsageError(f"--part {text}: need 0 <= I < N")
    return i, n


@dataclass(frozen=True)
class EncodeArgs:
    """The encoder's resolved settings: one typed, immutable record built from the command line
    (`from_namespace`), checked as a whole by `validate_args`. Field meanings: `build_parser`."""

    tokenizer_path: str
    data_loader_path: str
    encode_type: str                      # pretrain | qa | chat
    max_length: int
    corpus_name: str | None = None
    output_path: str | None = None
    tokenizer_backend: str = "auto"       # auto | gigatoken | tokenizers | transformers
    cross_check_every: int = CROSS_CHECK_EVERY
    data_loader_args: tuple[str, ...] = ()
    template: str = "none"                # resolved: chat for chat / --chat_template, else none
    chat_template: str | None = None      # --chat_template: a jinja file or builtin:NAME
    truncation: str = DEFAULT_TRUNCATION
    merge_data: bool = False
    pack_window: int = DEFAULT_PACK_WINDOW
    drop_remainder: bool = False
    save_dtype: str = "auto"
    tokens_per_file: float = 5e8
    num_workers: int | None = None        # None: engine default (gigatoken: all cores)
    add_tokens: tuple[str, ...] = ()
    overwrite: bool = False
    skip_invalid: bool = False
    analyze: bool = False
    plot: bool = False
    part: str | None = None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "EncodeArgs":
        """Typed copy of parsed flags, with the template default resolved (`ns` is not changed)."""
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        for key in ("data_loader_args", "add_tokens"):
            values[key] = tuple(values.get(key) or ())
        if values.get("template") is None:
            values["template"] = "chat" if values["encode_type"] in ("chat", "preference", "kto") or \
                values.get("chat_template") is not None else "none"
        return cls(**values)


def validate_args(args: EncodeArgs) -> list[str]:
    """Every problem with `args` (cross-flag checks argparse cannot express), each naming the flag
    and the fix; empty when the run can start.

    >>> validate_args(EncodeArgs("t", "p.py", "qa", max_length=0, num_workers=0))[:2]
    ['--output_path and --corpus_name are required (unless --analyze)', '--max_length 0: must be >= 1']
    """
    problems = []
    if not args.analyze and (not args.output_path or not args.corpus_name):
        problems.append("--output_path and --corpus_name are required (unless --analyze)")
    if args.corpus_name and ("/" in args.corpus_name or args.corpus_name.startswith(".")):
        problems.append(f"--corpus_name {args.corpus_name!r}: must be a plain directory name "
                        f"(no '/', not starting with '.'); put the path in --output_path")
    if args.plot and not args.analyze and importlib.util.find_spec("matplotlib") is None:
        problems.append("--plot needs matplotlib: pip install matplotlib (or drop --plot)")
    if args.max_length < 1:
        problems.append(f"--max_length {args.max_length}: must be >= 1")
    if args.num_workers is not None and args.num_workers < 1:
        problems.append(f"--num_workers {args.num_workers}: must be >= 1 (or omit it)")
    if args.pack_window < 1:
        problems.append(f"--pack_window {args.pack_window}: must be >= 1")
    if args.chat_template is not None:
        if args.encode_type == "pretrain":
            problems.append("--chat_template has no effect with --encode_type pretrain (no "
                            "prompt format); drop it or use --encode_type chat")
        elif args.template != "chat":
            problems.append(f"--chat_template works with --template chat, not --template "
                            f"{args.template}")
    if args.cross_check_every < 0:
        problems.append(f"--cross_check_every {args.cross_check_every}: must be >= 0 (0 = off)")
    if args.max_length >= 1 and args.tokens_per_file < args.max_length:
        problems.append(f"--tokens_per_file {args.tokens_per_file:g} is smaller than --max_length "
                        f"{args.max_length}")
    try:
        parse_part(args.part)
    except UsageError as e:
        problems.append(str(e))
    for item in args.data_loader_args:
        if "=" not in item or item.startswith("="):
            problems.append(f"--data_loader_args {item!r}: expected key=value")
    return problems


def check_args(args: EncodeArgs | argparse.Namespace) -> None:
    """Raise one UsageError listing every problem `validate_args` finds (a parsed Namespace, as
    encoder.distributed passes, is checked through its EncodeArgs copy and left unchanged)."""
    if isinstance(args, argparse.Namespace):
        args = EncodeArgs.from_namespace(args)
    problems = validate_args(args)
    if problems:
        raise UsageError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems:\n  " + "\n  ".join(problems))
