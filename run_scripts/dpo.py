"""The preference demo: SFT, then DPO, on the email task. CPU only, offline, a few minutes.

    bash run_scripts/dpo.sh                   # sets up the environment, then runs this
    .venv/bin/python run_scripts/dpo.py --quick    # the CI smoke variant (few steps, no targets)

Every step is a real call of the real programs:
  1. tokenizer + tiny Llama   (as run_scripts/demo.py)
  2. SFT data   encoder/main.py --encode_type qa (template_generator plugin, 7 in 8 combinations)
  3. SFT        trainer/train.py on 2 CPU ranks, then trainer.export
  4. pairs      encoder/main.py --encode_type preference (template_pairs plugin: chosen = the right
                email, rejected = the same email with a wrong name or day), train and held-out
  5. DPO        trainer/train.py --objective dpo from the SFT model (reference = the SFT model),
                eval on the held-out pairs, then trainer.export
  6. check      held-out reward accuracy (DPO's implicit reward, chosen > rejected) and exact match
                of greedy generations (trainer.generate), before (SFT) and after DPO.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "run_scripts"))
sys.path.insert(0, str(ROOT))

from demo import (PY, TASK, build_model, deepspeed_train, exact_matches,  # noqa: E402
                  heldout_generations, run, step, train_tokenizer)

PLUGINS = ROOT / "encoder" / "user_data_loader"
HOLDOUT = ["holdout_every=8"]


def encode(out: Path, tokenizer_dir: Path, *, plugin: str, encode_type: str, name: str,
           split: str, env: dict, merge: bool) -> Path:
    run([PY, "encoder/main.py", "--tokenizer_path", tokenizer_dir, "--data_loader_path",
         PLUGINS / plugin, "--data_loader_args", f"template={TASK / 'template.txt'}",
         f"params={TASK / 'params.json'}", *HOLDOUT, f"split={split}", "--corpus_name", name,
         "--encode_type", encode_type, "--template", "alpaca", "--output_path", out / "data",
         "--max_length", 128, *(["--merge_data"] if merge else [])], env=env)
    return out / "data" / name


def exact_match(model: Path, out: Path, name: str, env: dict) -> tuple[int, int]:
    """Greedy generations on the held-out prompts vs the expected emails."""
    gens = heldout_generations(model, out, name, env=env)
    return exact_matches(gens), len(gens)


def reward_accuracy(policy: Path, reference: Path, pairs: Path, beta: float) -> dict:
    """Held-out pairs: DPO's implicit reward accuracy (beta * (log pi - log ref), chosen >
    rejected) and the log-prob accuracy (log pi(chosen) > log pi(rejected)), trainer code path."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardfmt import open_dataset
    from trainer.attention import register_varlen_sdpa
    from trainer.data import model_inputs
    from trainer.preference import PairSource, collate_pairs, sequence_logps
    register_varlen_sdpa()
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32,
                                                   attn_implementation="sdpa_varlen").eval()
              for p in (policy, reference)]
    src = PairSource(open_dataset(pairs))
    wins = logp_wins = n = 0
    with torch.no_grad():
        for start in range(0, len(src), 16):
            batch = collate_pairs([src[i] for i in range(start, min(start + 16, len(src)))],
                                  pad_id=0, flatten=True)
            inputs = model_inputs(batch, "sdpa_varlen", torch.float32, torch.device("cpu"))
            pol, _ = sequence_logps(models[0], inputs, batch)
            ref, _ = sequence_logps(models[1], inputs, batch)
            reward = beta * (pol - ref)
            wins += int((reward[0::2] > reward[1::2]).sum())
            logp_wins += int((pol[0::2] > pol[1::2]).sum())
            n += batch["num_pairs"]
    return {"pairs": n, "reward_accuracy": wins / n, "logp_accuracy": logp_wins / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "dpo_out"), help="where every artifact goes")
    ap.add_argument("--quick", action="store_true", help="a few steps each (CI smoke variant)")
    ap.add_argument("--sft_steps", type=int, default=None, help="default 600 (quick: 4)")
    ap.add_argument("--dpo_steps", type=int, default=None, help="default 400 (quick: 4)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--dpo_lr", type=float, default=2e-3)
    ap.add_argument("--sft_weight", type=float, default=0.2, help="chosen NLL added to DPO")
    args = ap.parse_args()
    sft_steps = args.sft_steps or (4 if args.quick else 600)
    dpo_steps = args.dpo_steps or (4 if args.quick else 400)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    step("1. tokenizer and model")
    tokenizer_dir = train_tokenizer(out / "tokenizer")
    base = build_model(out / "base_model", tokenizer_dir)

    step("2-3. SFT (qa, packed) and export")
    sft_data = encode(out, tokenizer_dir, plugin="template_generator.py", encode_type="qa",
                      name="emails", split="train", env=env, merge=True)
    deepspeed_train(["--model_path", base, "--data_path", sft_data, "--output_path", out / "runs",
           "--save_name", "sft", "--max_steps", sft_steps, "--micro_batch_size", 4,
           "--learning_rate", 3e-3, "--warmup_ratio", 0.05, "--lr_scheduler", "linear",
           "--logging_steps", 20], env=env)
    sft = out / "sft_model"
    run([PY, "-m", "trainer.export", "--checkpoint",
         out / "runs" / "sft" / "checkpoints" / f"step_{sft_steps}", "--output", sft], env=env)

    step("4. preference pairs (chosen = right email, rejected = wrong name or day)")
    pairs = encode(out, tokenizer_dir, plugin="template_pairs.py", encode_type="preference",
                   name="pairs", split="train", env=env, merge=False)
    heldout_pairs = encode(out, tokenizer_dir, plugin="template_pairs.py",
                           encode_type="preference", name="pairs_heldout", split="heldout",
                           env=env, merge=False)
    run([PY, "-m", "shardfmt", "inspect", pairs, "--show", 1], env=env)

    step("5. DPO from the SFT model (reference = the SFT model) and export")
    deepspeed_train(["--model_path", sft, "--data_path", pairs, "--eval_data_path", heldout_pairs,
           "--output_path", out / "runs", "--save_name", "dpo", "--objective", "dpo",
           "--beta", args.beta, "--max_steps", dpo_steps, "--micro_batch_size", 4,
           "--sft_weight", args.sft_weight, "--learning_rate", args.dpo_lr,
           "--lr_scheduler", "linear", "--logging_steps", 10,
           "--eval_steps", max(dpo_steps // 2, 1)], env=env)
    dpo = out / "dpo_model"
    run([PY, "-m", "trainer.export", "--checkpoint",
         out / "runs" / "dpo" / "checkpoints" / f"step_{dpo_steps}", "--output", dpo], env=env)

    step("6. held-out check: before (SFT) and after DPO")
    before = reward_accuracy(sft, sft, heldout_pairs, args.beta)
    after = reward_accuracy(dpo, sft, heldout_pairs, args.beta)
    em_before = exact_match(sft, out, "sft", env)
    em_after = exact_match(dpo, out, "dpo", env)
    result = {"heldout_pairs": after["pairs"],
              "reward_accuracy": {"sft": before["reward_accuracy"], "dpo": after["reward_accuracy"]},
              "logp_accuracy": {"sft": before["logp_accuracy"], "dpo": after["logp_accuracy"]},
              "exact_match": {"sft": em_before[0] / em_before[1], "dpo": em_after[0] / em_after[1],
                              "of": em_before[1]},
              "sft_steps": sft_steps, "dpo_steps": dpo_steps, "beta": args.beta,
              "dpo_lr": args.dpo_lr, "sft_weight": args.sft_weight,
              "wall_seconds": round(time.time() - started, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nheld-out pairs: {after['pairs']}")
    print(f"reward accuracy   SFT (policy = reference) {before['reward_accuracy']:.1%}   "
          f"after DPO {after['reward_accuracy']:.1%}")
    print(f"log-prob accuracy SFT {before['logp_accuracy']:.1%}   after DPO "
          f"{after['logp_accuracy']:.1%}")
    print(f"exact match       SFT {em_before[0]}/{em_before[1]}   after DPO "
          f"{em_after[0]}/{em_after[1]}")
    log = out / "runs" / "dpo" / "train_log.jsonl"
    for label, path in (("DPO training log (JSONL)", log),
                        ("DPO curves", out / "runs" / "dpo" / "preference_curves.png"),
                        ("SFT model", sft), ("DPO model", dpo), ("result", out / "result.json")):
        print(f"  {label:<26} {path}{'' if path.exists() else '  (missing!)'}")
    print(f"\ndpo demo finished in {time.time() - started:.0f} s")
    if not args.quick:
        if after["reward_accuracy"] < 0.95:
            raise SystemExit("dpo demo: held-out reward accuracy < 95%")
        if em_after[0] < em_before[0]:
            raise SystemExit("dpo demo: exact match fell after DPO")


if __name__ == "__main__":
    main()
