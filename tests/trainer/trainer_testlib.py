"""Helpers for trainer tests: a tiny tokenizer, tiny Llama/Qwen2 models, shardfmt datasets (all
built in-process, no downloads), and running trainer/train.py under a launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The interpreter the deepspeed/torchrun launchers' shebangs name (the venv's real path): 1-process
# runs started with it import DeepSpeed from the same path, so DeepSpeed's JIT op (cpu_adam)
# built by one kind of run is reused by the other instead of rebuilt (~1 min).
_REAL_VENV_PYTHON = Path(sys.prefix).resolve() / "bin" / "python"
LAUNCHER_PYTHON = str(_REAL_VENV_PYTHON if _REAL_VENV_PYTHON.exists() else Path(sys.executable))
NUM_WORDS = 120  # tokenizer: 4 specials + w0..w119  -> 124 ids


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(NUM_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: Path, *, vocab_size: int, kind: str = "llama", tie: bool = True,
                max_positions: int = 128, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(str(out_dir))
    return model


def counting_doc(rng: np.random.Generator, length: int) -> np.ndarray:
    """A learnable document: w_s, w_{s+1}, ... (mod NUM_WORDS), ids offset by the 4 specials."""
    start = int(rng.integers(0, NUM_WORDS))
    return 4 + (start + np.arange(length)) % NUM_WORDS


def write_dataset(out_dir: Path, name: str, tokenizer, *, num_samples: int, seed: int = 0,
                  max_length: int = 64, extra_ids: list[int] | None = None,
                  tokenizer_info: dict | None = None) -> Path:
    """Packed samples of 1-3 counting documents; the first 2 tokens of each doc are not loss tokens."""
    from shardfmt import ShardWriter, tokenizer_identity
    rng = np.random.default_rng(seed)
    info = tokenizer_info if tokenizer_info is not None else tokenizer_identity(tokenizer)
    dtype = "int32" if extra_ids else "uint16"
    with ShardWriter(out_dir, name, dtype=dtype, encode_type="pretrain", max_length=max_length,
                     tokenizer_info=info, packing="bfd", overwrite=True) as w:
        for _ in range(num_samples):
            docs, room = [], max_length
            for _ in range(int(rng.integers(1, 4))):
                if room < 6:
                    break
                n = int(rng.integers(5, min(room, 30) + 1))
                ids = counting_doc(rng, n)
                if extra_ids:
                    ids[int(rng.integers(0, n))] = extra_ids[int(rng.integers(0, len(extra_ids)))]
                mask = np.ones(n, dtype=bool)
                mask[:2] = False
                docs.append((ids, mask))
                room -= n
            w.add_sample(docs)
    return out_dir / name


# The end-to-end runs (tests/trainer/test_e2e.py, and the ZeRO-2 run that conftest.py shares).
STEPS = 8
COMMON = ["--max_steps", str(STEPS), "--learning_rate", "3e-3", "--lr_scheduler", "cosine",
          "--warmup_ratio", "0.125", "--logging_steps", "1", "--seed", "7", "--precision", "fp32",
          "--num_workers", "1"]


def base_args(assets, out: Path, *extra: str, model: str = "llama") -> list[str]:
    return ["--model_path", str(assets[model]), "--data_path", str(assets["train"]),
            "--output_path", str(out), *COMMON, *extra]


def run_env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    # A private JIT cache: a cache shared with other virtualenvs rebuilds DeepSpeed's ops (minutes).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(launcher: str = "python", nproc: int = 1) -> list[str]:
    """trainer/train.py under `python` (1 process), `deepspeed --num_gpus N` or
    `torchrun --nproc_per_node N` (one process fewer before the ranks start: ~9 s less here)."""
    script = str(REPO / "trainer" / "train.py")
    if launcher == "python":
        return [LAUNCHER_PYTHON, script]
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), script]
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), script]
    raise ValueError(launcher)


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_train(args: list[str], *, launcher: str = "python", nproc: int = 1, timeout: int = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run trainer/train.py under `python`, `deepspeed --num_gpus N` or `torchrun`."""
    proc = subprocess.run(train_cmd(launcher, nproc) + args, cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)
    return check_ok(proc) if check else proc


def run_trains(arg_lists: list[list[str]], *,
               timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Several independent single-process runs at once (not checked: see check_ok).

    A short run of a tiny model is almost all interpreter start-up and imports (~15 s of one
    core); two such runs side by side on the 2 cores cost about the time of one. Results do not
    depend on it: every run is deterministic on CPU with OMP_NUM_THREADS=1."""
    return run_together([("python", 1, args) for args in arg_lists], timeout=timeout)


def run_together(jobs: list[tuple[str, int, list[str]]], *, env: dict | None = None,
                 timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start every (launcher, nproc, args) of `jobs` at once (see train_cmd), wait for all, and
    return a CompletedProcess each, in order (not checked: see check_ok). `env`: run_env() if
    None. A run still going after `timeout` s is killed."""
    from side_by_side import run_side_by_side  # tests/side_by_side.py (tests/ is on sys.path
    # under pytest; imported here so that bench/gpu/gpu_check.py can use this module without it)
    return run_side_by_side([train_cmd(launcher, nproc) + args for launcher, nproc, args in jobs],
                            cwd=REPO, env=run_env() if env is None else env, timeout=timeout)


def run_chains(chains: list[list[tuple[str, str, int, Callable[[], list[str]]]]], *,
               env: dict | None = None, timeout: int = 300) -> dict:
    """Run the chains side by side, the (name, launcher, nproc, args()) of each one after another
    (a resume starts as soon as the run it resumes has saved, not after every other run; args()
    is called then, so it can name that run's checkpoint). Every run must succeed (check_ok):
    {name: CompletedProcess}."""
    def run_chain(chain):
        return {name: check_ok(run_together([(launcher, nproc, args())], env=env,
                                            timeout=timeout)[0])
                for name, launcher, nproc, args in chain}

    with ThreadPoolExecutor(len(chains)) as pool:
        futures = [pool.submit(run_chain, chain) for chain in chains]
        return {name: proc for future in futures for name, proc in future.result().items()}


def only_run_dir(output: Path) -> Path:
    runs = [p for p in output.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def losses(ckpt_dir: Path) -> list[float]:
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    return [h["loss"] for h in state["loss_history"]]


def train_in_process(argv: list[str], *, run: bool = True):
    """trainer/train.py's Trainer in this process (1 rank): (trainer, final state or None).

    The lone-process launcher variables DeepSpeed reads are set for the call and restored after
    (as trainer/train.py's main() sets them; the library itself leaves the environment alone).
    """
    from trainer.args import parse_and_validate
    from trainer.dist import lone_process_env
    from trainer.recipe import Trainer
    added = lone_process_env(os.environ)
    os.environ.update(added)
    try:
        trainer = Trainer(parse_and_validate(argv))
        return trainer, (trainer.run() if run else None)
    finally:
        for name in added:
            os.environ.pop(name, None)
