"""Tokenizer, model and LoRA set-up, and the data-vs-model checks that must pass before step 1."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from shardfmt import vocab_hash
from trainer.attention import VARLEN_SDPA, register_varlen_sdpa
from trainer.dtypes import PRECISION_DTYPES
from trainer.errors import DataModelMismatch, UsageError
from trainer.families import VARLEN_MODEL_TYPES

log = logging.getLogger("trainer")

# None: derived from the model by trainer/lora.py (target_modules: every Linear layer but the
# output layer; lora_dropout: 0.05, or 0 where MoE experts are adapted, which peft requires)
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": None, "target_modules": None,
                "modules_to_save": None}


def resolve_precision(precision: str) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return PRECISION_DTYPES[precision]


def _causal_lm_class(config):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def resolve_attn_implementation(requested: str, model) -> str:
    """The attention implementation to load `model` (a config, or a model_type) with.

    auto, in order: flash_attention_2 when flash_attn is installed, a GPU is present and the model
    class supports it; sdpa_varlen (per-document SDPA on flattened micro-batches,
    trainer/attention.py) for the model types it is checked for (trainer/families.py); sdpa with a
    block-diagonal mask; eager for model classes that do not support sdpa (Gemma2: attention-logit
    soft-capping). Logs one line saying what it chose and why.
    """
    from transformers import CONFIG_MAPPING
    config = CONFIG_MAPPING[model]() if isinstance(model, str) and model in CONFIG_MAPPING else model
    model_type = getattr(config, "model_type", model if isinstance(model, str) else None)
    cls = _causal_lm_class(config) if config is not None and not isinstance(config, str) else None
    name = cls.__name__ if cls is not None else repr(model_type)
    sdpa_ok = cls is None or bool(getattr(cls, "_supports_sdpa", False))
    if requested == VARLEN_SDPA and model_type not in VARLEN_MODEL_TYPES:
        raise UsageError(f"--attn_implementation sdpa_varlen: not checked for model_type "
                         f"{model_type!r} (only {', '.join(sorted(VARLEN_MODEL_TYPES))}); use "
                         f"--attn_implementation auto or sdpa")
    if requested in ("sdpa", VARLEN_SDPA) and not sdpa_ok:
        raise UsageError(f"--attn_implementation {requested}: {name} does not support sdpa "
                         f"(transformers' _supports_sdpa is False); use --attn_implementation "
                         f"auto or eager")
    if requested != "auto":
        return requested
    flash_ok = cls is not None and bool(getattr(cls, "_supports_flash_attn", False))
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None and flash_ok:
        choice, why = "flash_attention_2", "flash-attn is installed, a GPU is present"
    elif not sdpa_ok:
        choice, why = "eager", (f"{name} does not support sdpa (e.g. Gemma2's attention-logit "
                                f"soft-capping); packed documents get a block-diagonal mask")
    elif model_type in VARLEN_MODEL_TYPES:
        choice, why = VARLEN_SDPA, "per-document SDPA on flattened micro-batches (no flash-attn)"
    else:
        choice, why = "sdpa", (f"sdpa_varlen is not checked for model_type {model_type!r}; "
                               f"packed documents get a block-diagonal mask")
    log.info("--attn_implementation auto -> %s: %s", choice, why)
    return choice


def load_model_config(path: str | Path):
    """The model's AutoConfig; a directory transformers cannot read is a UsageError naming it."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a loadable Hugging Face model config ({e}); point "
                         f"--model_path at a directory with a valid config.json") from e


def load_training_tokenizer(path: str | Path, *, flag: str | None = None):
    """The tokenizer at `path`. Given by a flag (`flag`, e.g. "--tokenizer_path"), one that does
    not load is a UsageError naming the flag, the path and the error: the user asked for it, and
    without it the tokenizer/data check would silently be off. The implicit tokenizer beside the
    model (flag None) may be absent (--from_scratch, a bare weights dir): None, with a warning."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        if flag is not None:
            raise UsageError(f"{flag} {path}: the tokenizer does not load ({type(e).__name__}: "
                             f"{e}); point {flag} at a directory with a valid tokenizer.json / "
                             f"tokenizer_config.json (the one the data was encoded with)") from e
        log.warning("no tokenizer loadable from %s (%s): checkpoints will hold no tokenizer and the "
                    "tokenizer/data check is skipped", path, e)
        return None


def manifest_added_tokens(manifests: list[dict]) -> dict[str, int]:
    """Added tokens the encoder's tokenizer had, {token: id}, merged over all datasets."""
    added: dict[str, int] = {}
    for m in manifests:
        for tok, i in (m.get("tokenizer") or {}).get("added_tokens", {}).items():
            added[tok] = int(i)
    return added


def add_special_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` (in order) as special tokens, keeping every existing token and special token.

    Returns the ids of the tokens that were new to the tokenizer.
    """
    from tokenizers import AddedToken
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new],
                             special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in new]


def add_manifest_tokens(tokenizer, manifest_tokens: dict[str, int]) -> list[int]:
    """Add the encoder's added tokens in id order; each must land on the id the data uses."""
    ordered = [t for t, _ in sorted(manifest_tokens.items(), key=lambda kv: kv[1])]
    new = add_special_tokens(tokenizer, ordered)
    wrong = {t: (i, tokenizer.convert_tokens_to_ids(t)) for t, i in manifest_tokens.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        detail = ", ".join(f"{t!r}: data id {a}, tokenizer id {b}" for t, (a, b) in wrong.items())
        raise DataModelMismatch(
            f"added tokens disagree between the dataset manifest and the tokenizer ({detail}). "
            f"Train from the tokenizer the encoder used (save it beside the model) or re-encode.")
    return new


def check_tokenizer_matches(tokenizer, manifests: list[dict], data_paths: list[str],
                            accepted_hashes: set[str], ignore: bool, *,
                            loaded_len: int | None = None, source: str | None = None) -> None:
    """Each manifest's vocab hash must be one of the model tokenizer's: as loaded, with the
    manifest's added tokens, or with --add_tokens too. `loaded_len`: its size as loaded, before
    those additions (the message gives true sizes)."""
    if tokenizer is None:
        return
    loaded_len = len(tokenizer) if loaded_len is None else loaded_len
    extra = len(tokenizer) - loaded_len
    ours_desc = (f"{source + ': ' if source else ''}{loaded_len} tokens"
                 + (f", {len(tokenizer)} with the {extra} added from the manifests/--add_tokens"
                    if extra else ""))
    ours = set(accepted_hashes) | {vocab_hash(tokenizer.get_vocab())}
    for path, m in zip(data_paths, manifests):
        info = m.get("tokenizer") or {}
        theirs = info.get("vocab_hash")
        if theirs is None:
            log.warning("%s: manifest records no tokenizer vocab_hash; cannot check it matches", path)
        elif theirs not in ours:
            msg = (f"{path} was encoded with tokenizer {info.get('path')!r} ({info.get('len')} "
                   f"tokens, vocab_hash {theirs}), which differs from the training tokenizer "
                   f"({ours_desc}; vocab_hash {sorted(h for h in ours if h)}). If the data's "
                   f"tokenizer extends the model's, pass it as --tokenizer_path DIR (the embeddings "
                   f"grow to it); else re-encode with the model's tokenizer, or pass "
                   f"--ignore_tokenizer_mismatch if you are sure.")
            if not ignore:
                raise DataModelMismatch(msg)
            log.warning("IGNORED (--ignore_tokenizer_mismatch): %s", msg)


def check_data_fits_model(*, max_token_id: int, max_length: int, embedding_rows: int,
                          max_positions: int | None, flag: str) -> None:
    """Token ids must index the embedding; samples must fit the position table."""
    if max_token_id >= embedding_rows:
        raise DataModelMismatch(
            f"{flag}: largest token id {max_token_id} but the model has {embedding_rows} embedding "
            f"rows; the data was encoded with a bigger vocabulary than the model has. Pass the "
            f"encoder's tokenizer as --tokenizer_path DIR (the embeddings grow to it when it extends "
            f"the model's tokenizer) or re-encode with this model's tokenizer.")
    if max_positions is not None and max_length > max_positions:
        raise DataModelMismatch(
            f"{flag}: samples up to {max_length} tokens but the model has {max_positions} positions "
            f"(max_position_embeddings, with any --rope_scaling applied); re-encode with "
            f"--max_length <= {max_positions}, or extend a RoPE model's context with "
            f"--rope_scaling yarn --rope_factor {-(-max_length // max_positions)}.")


def load_training_model(model_path: str, *, from_scratch: bool, dtype: torch.dtype,
                        attn_implementation: str, config=None, load_kwargs: dict | None = None):
    """AutoModelForCausalLM from weights, or random init from config (--from_scratch).

    `config`: a modified config to load with (--rope_scaling); `load_kwargs`: extra
    from_pretrained arguments (--quantization: trainer/quantize.py). Under ZeRO-3 the caller must
    hold an HfDeepSpeedConfig so parameters load partitioned.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    if attn_implementation == VARLEN_SDPA:
        register_varlen_sdpa()
    if from_scratch:
        config = config if config is not None else AutoConfig.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    else:
        extra = dict(load_kwargs or {})
        if config is not None:
            extra["config"] = config
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                     attn_implementation=attn_implementation, **extra)
    model.config.use_cache = False
    return model


def resize_embeddings(model, new_rows: int) -> None:
    """Grow input and output embeddings (tied or not) to `new_rows`, new rows mean-initialised."""
    if new_rows > model.get_input_embeddings().weight.shape[0] or (
            new_rows > model.config.vocab_size):
        model.resize_token_embeddings(new_rows, mean_resizing=True)


def embedding_rows(model) -> int:
    emb = model.get_input_embeddings()
    ds_shape = getattr(emb.weight, "ds_shape", None)  # ZeRO-3 partitioned parameter
    return int(ds_shape[0] if ds_shape is not None else emb.weight.shape[0])


def _module_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.split(".")[-1]
    raise ValueError("module not found in model")


def lora_settings(lora_config_path: str | None) -> dict:
    """LoRA JSON (r, alpha|lora_alpha, dropout|lora_dropout, target_modules, modules_to_save, ...)."""
    cfg = dict(DEFAULT_LORA)
    if lora_config_path:
        user = json.loads(Path(lora_config_path).read_text())
        aliases = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
        for key, value in user.items():
            cfg[aliases.get(key, key)] = value
    return cfg


def apply_lora(model, settings: dict, new_token_ids: list[int], *, zero3: bool = False,
               user_config: bool = False):
    """Wrap `model` with a fresh LoRA adapter; new token rows trained too (trainer/vocab.py)."""
    from peft import LoraConfig, get_peft_model

    from trainer.vocab import new_row_lora_settings
    cfg, how = new_row_lora_settings(model, settings, new_token_ids, user_config=user_config,
                                     zero3=zero3)
    if how:
        log.info("%s", how)
    cfg = dict(cfg)
    cfg.setdefault("task_type", "CAUSAL_LM")
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    return peft_model


def load_lora(model, adapter_dir: str):
    """Resume: re-attach a saved adapter as trainable."""
    from peft import PeftModel
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def enable_gradient_checkpointing(model, use_lora: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if use_lora:
        model.enable_input_require_grads()


def max_positions(model) -> int | None:
    """Longest sample the model can position (with --rope_scaling: the scaled limit)."""
    from trainer.rope import position_limit
    return position_limit(model.config)
