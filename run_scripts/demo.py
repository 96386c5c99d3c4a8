"""The quickstart demo: from a template to a model that writes the right email. CPU only, offline.

    bash run_scripts/demo.sh                  # sets up .venv, then runs this
    .venv/bin/python run_scripts/demo.py --quick   # a shorter variant (the CI test runs it)

Every step is a real call of the real programs, exactly as a user would type them:
  1. data      the template generator plugin turns a template and lists of names, topics and days
               into every combination; 1 in 8 combinations is held out for the final check.
  2. tokenizer a small byte-level BPE trained in-process with the `tokenizers` library (on the
               prompts as the alpaca template renders them).
  3. model     a tiny Llama (2 layers, hidden 64, ~0.1M parameters) built from a config.
  4. encode    python encoder/main.py ... --merge_data      (packed qa shards + manifest)
  5. train     deepspeed --num_gpus 2 trainer/train.py ...  (2 CPU ranks, ZeRO-2, checkpoint mid-way)
  6. export    python -m trainer.export ...                 (a plain Hugging Face model)
  7. generate  python -m trainer.generate ...               (held-out prompts: expected vs generated)
The task is learnable and checkable: the answer must copy the recipient, topic and day from the
prompt into a fixed letter, so exact-match accuracy on unseen combinations shows real learning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TASK = ROOT / "run_scripts" / "demo_task"


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(cmd: list[str], *, env: dict | None = None) -> str:
    """Run a command as a user would, echo it, stream its output, fail loudly."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout[-4000:], end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
    return proc.stdout


def train_tokenizer(out: Path) -> Path:
    """A 400-token byte-level BPE fitted on the demo's own text, saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT / "encoder" / "user_data_loader"))
    from template_generator import data_loader  # the same plugin the encoder will run

    from encoder.templates import ALPACA_SYSTEM  # the prompt preamble of --template alpaca
    texts = [f"{ALPACA_SYSTEM}\n\n### Instruction:\n{r['q']}\n\n### Response:\n{r['a']}"
             for r in data_loader(template=str(TASK / "template.txt"),
                                  params=str(TASK / "params.json"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # Llama convention: the tokenizer itself adds BOS, so the encoder adds it once per document.
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                            special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")
    hf.save_pretrained(out)
    print(f"tokenizer: {len(hf)} tokens -> {out}")
    return out


def build_model(out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"model: tiny Llama, {sum(p.numel() for p in model.parameters()):,} parameters -> {out}")
    return out


def deepspeed_train(args: list, *, env: dict, ranks: int = 2) -> None:
    """trainer/train.py under `deepspeed --num_gpus N` (N CPU ranks on gloo), ZeRO-2, fp32. A free
    rendezvous port, not the launcher's fixed 29500: two runs on one machine would otherwise meet
    in the same store (one fails with EADDRINUSE, the other's ranks wait)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run([ROOT / ".venv" / "bin" / "deepspeed", "--num_gpus", ranks, "--master_port", port,
         "trainer/train.py", *args, "--zero_stage", 2, "--precision", "fp32", "--no_timestamp"],
        env=env)


def heldout_generations(model: Path, out: Path, name: str, *, env: dict) -> list[dict]:
    """Greedy generations (trainer.generate) on the held-out prompts: dicts with prompt, expected
    and generated."""
    sys.path.insert(0, str(ROOT / "encoder" / "user_data_loader"))
    from template_generator import data_loader
    rows = list(data_loader(template=str(TASK / "template.txt"), params=str(TASK / "params.json"),
                            holdout_every=8, split="heldout"))
    prompts = out / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = out / f"generations{'_' + name if name else ''}.jsonl"
    run([PY, "-m", "trainer.generate", "--model", model, "--prompts_file", prompts,
         "--output", results, "--max_new_tokens", 48], env=env)
    return [json.loads(line) for line in results.read_text().splitlines()]


def exact_matches(gens: list[dict]) -> int:
    return sum(g["generated"].strip() == g["expected"].strip() for g in gens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "demo_out"), help="where every artifact goes")
    ap.add_argument("--quick", action="store_true", help="fewer steps (CI smoke variant)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600)")
    args = ap.parse_args()
    steps = args.steps or (120 if args.quick else 600)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    plugin = ROOT / "encoder" / "user_data_loader" / "template_generator.py"
    plugin_args = [f"template={TASK / 'template.txt'}", f"params={TASK / 'params.json'}"]

    step("1-3. tokenizer and model")
    tokenizer_dir = train_tokenizer(out / "tokenizer")
    model_dir = build_model(out / "base_model", tokenizer_dir)

    step("4. encode (packed)")
    run([PY, "encoder/main.py", "--tokenizer_path", tokenizer_dir, "--data_loader_path", plugin,
         "--data_loader_args", *plugin_args, "holdout_every=8", "split=train",
         "--corpus_name", "emails", "--encode_type", "qa", "--template", "alpaca",
         "--output_path", out / "data",
         "--max_length", 256, "--merge_data", "--plot"], env=env)
    run([PY, "-m", "shardfmt", "inspect", out / "data" / "emails", "--show", 1], env=env)

    step("5. train (2 CPU ranks, DeepSpeed ZeRO-2)")
    deepspeed_train(["--model_path", model_dir, "--data_path", out / "data" / "emails",
                     "--output_path", out / "runs", "--save_name", "emails",
                     "--max_steps", steps, "--micro_batch_size", 4,
                     "--gradient_accumulation_steps", 1, "--learning_rate", 3e-3,
                     "--warmup_ratio", 0.05, "--lr_scheduler", "linear",
                     "--save_steps", steps // 2, "--logging_steps", 20], env=env)
    run_dir = out / "runs" / "emails"
    final = run_dir / "checkpoints" / f"step_{steps}"

    step("6. export")
    exported = out / "exported_model"
    run([PY, "-m", "trainer.export", "--checkpoint", final, "--output", exported], env=env)

    step("7. generate on held-out prompts")
    gens = heldout_generations(exported, out, "", env=env)
    results = out / "generations.jsonl"
    correct = exact_matches(gens)
    for g in gens[:3]:
        print(f"\nprompt:    {g['prompt']!r}\nexpected:  {g['expected']!r}\n"
              f"generated: {g['generated']!r}")
    print(f"\nheld-out exact match: {correct}/{len(gens)} = {correct / len(gens):.0%}")

    step("artifacts")
    for label, path in (("shards + manifest + stats", out / "data" / "emails"),
                        ("length histogram", out / "data" / "emails" / "lengths.png"),
                        ("training log (JSONL)", run_dir / "train_log.jsonl"),
                        ("checkpoints", run_dir / "checkpoints"),
                        ("loss curve", final / "loss_curve.png"),
                        ("exported model", exported), ("generations", results)):
        print(f"  {label:<28} {path}{'' if path.exists() else '  (missing!)'}")
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    if not args.quick and correct / len(gens) < 0.8:
        raise SystemExit("demo: the model did not learn the task (accuracy < 80%)")


if __name__ == "__main__":
    main()
