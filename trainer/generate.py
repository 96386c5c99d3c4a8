"""Generate with a trained model, formatting prompts exactly as the encoder did for training.

    python -m trainer.generate --model exported/ --prompt "Write an email to Alice about ..."
    python -m trainer.generate --model BASE --adapter runs/RUN/checkpoints/step_600 --interactive
    python -m trainer.generate --model exported/ --prompts_file heldout.jsonl --output gen.jsonl

The prompt format comes from `prompt_format.json` (the dataset manifest's template and
special-token policy, saved by the trainer in every checkpoint and copied by `trainer.export`):
the same template, the same BOS rule and the same per-piece tokenization as the training samples
(`encoder.document_encoder.DocumentEncoder.encode_prompt`; the reuse is deliberate, so the two can never drift).
Generation stops at EOS / the template's end-of-turn token. `--prompt` and `--interactive`
stream tokens as they come; `--prompts_file` (JSONL rows {"q", "a"?, "system"?} or
{"messages": [...], "tools": [...]?}) writes {"prompt", "expected", "generated"} rows. Tool
conversations (tools, assistant tool_calls, role "tool") are rendered by the same chat template
as in training, and generation stops at the template's end-of-turn token, so a generated tool call
ends the turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from shardfmt.writer import write_text_atomic
from trainer.errors import OUR_ERRORS, InputNotFoundError, RunError, UsageError, exit_code
from trainer.export import PROMPT_FORMAT


def load_prompt_format(*dirs: Path | None, template: str | None) -> dict:
    for d in dirs:
        if d is not None and (d / PROMPT_FORMAT).is_file():
            fmt = json.loads((d / PROMPT_FORMAT).read_text())
            return {**fmt, "template": template or fmt["template"]}
    if template:
        return {"encode_type": "qa", "template": template, "max_length": 1 << 20}
    return {"encode_type": "pretrain", "template": None}  # a pretrain model: plain continuation


def check_inputs(model_dir: Path, adapter_dir: Path | None, prompts_file: str | None) -> None:
    """Every missing input at once, each naming its flag (before any model loads)."""
    problems = []
    if not (model_dir / "config.json").is_file():
        problems.append(f"--model {model_dir}: no config.json there (expected a Hugging Face model "
                        f"dir: an export, or a full-weights checkpoint)")
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        problems.append(f"--adapter {adapter_dir}: no adapter_config.json there (expected a LoRA "
                        f"checkpoint dir, checkpoints/step_N)")
    if prompts_file is not None and not Path(prompts_file).is_file():
        problems.append(f"--prompts_file {prompts_file}: file not found")
    if problems:
        raise InputNotFoundError("; ".join(problems))


def read_prompt_rows(path: str) -> list[dict]:
    """--prompts_file rows; a line that is not JSON is refused naming the file and line."""
    rows = []
    for k, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UsageError(f"--prompts_file {path}: line {k} is not JSON ({e}); one "
                             f"{{\"q\": ...}} or {{\"messages\": [...]}} object per line") from e
    return rows


def load_model_for_generation(model_dir: Path, adapter_dir: Path | None):
    """Model (+ LoRA adapter on a base resized like in training) and the matching tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() \
        else model_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        from trainer.export import grow_like_training
        grow_like_training(model, adapter_dir, str(model_dir), tokenizer)
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer, tok_dir


def make_prompt_encoder(tokenizer, tok_dir: Path, fmt: dict):
    """The training data's prompt encoder; a template this tokenizer cannot use is a UsageError."""
    from encoder.document_encoder import DocumentEncoder, EncoderSpec
    from encoder.errors import TemplateError
    recorded = ((fmt.get("special_tokens") or {}).get("template") or {})
    chat_template = recorded.get("chat_template") if fmt["template"] == "chat" else None
    spec = EncoderSpec(str(tok_dir), fmt.get("encode_type", "qa"), int(fmt.get("max_length", 1 << 20)),
                       template=fmt["template"], chat_template=chat_template,
                       chat_template_source=recorded.get("source"))
    try:
        return DocumentEncoder(spec, tokenizer=tokenizer)
    except TemplateError as e:
        raise UsageError(f"template {fmt['template']!r} cannot be used with the tokenizer in "
                         f"{tok_dir}: {e}; pass --template NAME to pick another") from e


def row_messages(row: dict | str, system: str | None = None) -> tuple[list[dict], str | None]:
    """A prompt row -> (messages without the answer, expected answer or None)."""
    if isinstance(row, str):
        row = {"q": row}
    if "messages" in row:
        from encoder.conversation import check_conversation, is_tool_row
        msgs = list(row["messages"])
        expected = msgs.pop() if msgs and msgs[-1]["role"] == "assistant" else None
        if is_tool_row(row):   # tools / tool calls / tool results: rendered by the chat template
            msgs = check_conversation({**row, "messages": msgs}, require_answer=False)
        if expected is not None and not expected.get("tool_calls"):
            expected = expected["content"]
        return msgs, expected
    msgs = [{"role": "system", "content": row.get("system") or system}] \
        if (row.get("system") or system) else []
    return msgs + [{"role": "user", "content": row["q"]}], row.get("a")


class PlainText:
    """Stands in for the prompt encoder when continuing plain text: stop at EOS only."""
    end_ids: list[int] = []


@torch.no_grad()
def generate_one(model, tokenizer, encoder, messages: list[dict], *, max_new_tokens: int,
                 temperature: float, stream: bool) -> tuple[str, list[int]]:
    from transformers import TextStreamer
    if encoder is None:  # pretrain: the text itself, with the tokenizer's own BOS convention
        prompt = tokenizer(messages[-1]["content"])["input_ids"]
        encoder = PlainText()
    else:
        prompt = encoder.encode_prompt(messages)
    stop = list(dict.fromkeys(encoder.end_ids + ([tokenizer.eos_token_id]
                                                 if tokenizer.eos_token_id is not None else [])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                           dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None, top_p=None,
                         top_k=None, eos_token_id=stop, pad_token_id=pad,
                         streamer=TextStreamer(tokenizer, skip_prompt=True,
                                               skip_special_tokens=True) if stream else None)
    new = out[0, len(prompt):].tolist()
    if new and new[-1] in stop:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=True), prompt


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir (exported, or a full checkpoint)")
    ap.add_argument("--adapter", help="LoRA adapter checkpoint dir to apply on --model")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more user prompts")
    src.add_argument("--prompts_file", help="JSONL of {'q','a'?,'system'?} or {'messages'} rows")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin")
    ap.add_argument("--system", help="system message for every prompt")
    ap.add_argument("--template", help="override the prompt template (default: prompt_format.json)")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="--prompts_file: write results as JSONL here")
    return ap


def main(argv: list[str] | None = None) -> int:
    """0 ok, 2 bad input or usage (argparse exits 2 itself), 1 the run failed; a bug: traceback."""
    from encoder.errors import EncoderError
    from encoder.errors import exit_code as encoder_exit_code
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except OUR_ERRORS as err:
        print(f"generate: {err}", file=sys.stderr)
        return exit_code(err)
    except EncoderError as err:  # prompts are formatted by the encoder (its row/template checks)
        print(f"generate: {err}", file=sys.stderr)
        return encoder_exit_code(err)


def _write_results(path: Path, results: list[dict]) -> None:
    """--output as JSONL, whole or not at all (a full disk leaves no half-written file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise RunError(f"--output {path}: could not write the {len(results)} results ({e}); the "
                       f"generations were printed above; free space or pick another path") from e


def _generate(args: argparse.Namespace) -> int:
    from encoder.templates import TEMPLATE_NAMES
    torch.manual_seed(args.seed)
    model_dir = Path(args.model)
    adapter_dir = Path(args.adapter) if args.adapter else None
    if args.template is not None and args.template not in TEMPLATE_NAMES:  # before any loading
        raise UsageError(f"--template {args.template}: choose one of {', '.join(TEMPLATE_NAMES)}")
    check_inputs(model_dir, adapter_dir, args.prompts_file)
    rows = read_prompt_rows(args.prompts_file) if args.prompts_file else None
    fmt = load_prompt_format(adapter_dir, model_dir, template=args.template)
    model, tokenizer, tok_dir = load_model_for_generation(model_dir, adapter_dir)
    encoder = make_prompt_encoder(tokenizer, tok_dir, fmt) if fmt["template"] else None
    if encoder is None:
        print(f"generate: no {PROMPT_FORMAT} in {args.adapter or args.model} (a pretrain model): "
              f"continuing the prompts as plain text; pass --template NAME for a chat/qa model",
              file=sys.stderr)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if rows is not None:
        results = []
        for k, row in enumerate(rows, start=1):
            try:
                messages, expected = row_messages(row, args.system)
            except (KeyError, TypeError, ValueError) as e:  # the row's shape, not our code
                raise UsageError(f"--prompts_file {args.prompts_file}: row {k}: {e!r}; expected "
                                 f"{{'q', 'a'?, 'system'?}} or {{'messages': [...]}}") from e
            text, _ = generate_one(model, tokenizer, encoder, messages, stream=False, **gen)
            results.append({"prompt": messages[-1]["content"], "expected": expected,
                            "generated": text})
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
        if args.output:
            _write_results(Path(args.output), results)
        return 0
    prompts = args.prompt or iter(lambda: input("\nprompt> "), "")
    try:
        for text in prompts:
            messages, _ = row_messages(text, args.system)
            if not args.interactive:
                print(f"### {text}")
            generate_one(model, tokenizer, encoder, messages, stream=True, **gen)
    except (EOFError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
