"""The data's vocabulary versus the model's: extension check, embedding growth, new-row init, and
which LoRA parameters train the new rows.

  * `check_extends`: a tokenizer (--tokenizer_path) may be used with a model only if every token
    of the model's own tokenizer keeps its id; otherwise rows would change meaning.
  * `grow_embeddings`: input (and untied output) embeddings grow to the tokenizer, logged once
    with both sizes and the initialisation, and described in a dict for resolved_config.json.
  * init "decompose" (fast vocabulary transfer, Gee et al. 2022): a new token's row is the mean of
    the rows of the pieces the model's original tokenizer splits the token into; the output row
    likewise from the output embedding when untied. "mean": every new row is the mean of all old
    rows (the same for input and output). Both are deterministic, so export and generate re-apply
    them and get bit-identical rows.
  * `new_row_lora_settings`: LoRA trains new rows by default (peft's trainable_token_indices on the
    input and, untied, the output embedding; modules_to_save where that is unavailable).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext

import torch

from trainer.errors import UsageError, VocabMismatch  # noqa: F401 - VocabMismatch re-exported

log = logging.getLogger("trainer")

SHOW_DIFFERENCES = 5  # differing tokens shown when a tokenizer does not extend the model's


def check_extends(model_tokenizer, tokenizer, *, model_path: str, tokenizer_path: str) -> None:
    """Every token of `model_tokenizer` must have the same id in `tokenizer`."""
    ours, theirs = model_tokenizer.get_vocab(), tokenizer.get_vocab()
    by_id = {i: t for t, i in theirs.items()}
    moved = [(i, t, by_id.get(i)) for t, i in sorted(ours.items(), key=lambda kv: kv[1])
             if theirs.get(t) != i]
    if moved:
        shown = "; ".join(f"id {i}: model {t!r}, tokenizer {o!r}" for i, t, o in moved[:SHOW_DIFFERENCES])
        raise VocabMismatch(
            f"--tokenizer_path {tokenizer_path} does not extend the tokenizer of --model_path "
            f"{model_path}: {len(moved)} of its {len(ours)} tokens have another id (first: {shown}). "
            f"The embedding rows would change meaning. Extend the model's tokenizer with "
            f"`python -m encoder.tokenizer extend --base {model_path} ...` and re-encode, or train "
            f"--from_scratch.")


def resolve_init(requested: str, model_tokenizer) -> tuple[str, str]:
    """(init, why). auto: decompose when the model's own tokenizer is known, else mean."""
    if requested == "decompose" and model_tokenizer is None:
        raise UsageError("--new_token_init decompose needs the model's original tokenizer (none "
                         "loads from --model_path); use --new_token_init mean")
    if requested != "auto":
        return requested, f"--new_token_init {requested}"
    if model_tokenizer is None:
        return "mean", "the model's original tokenizer is unknown"
    return "decompose", "default when the model's own tokenizer is known"


@dataclasses.dataclass
class Resize:
    """One embedding growth, as logged and saved in resolved_config.json["vocab"]["resize"]."""
    from_rows: int
    to_rows: int
    init: str
    why: str
    tied: bool
    decomposed: int = 0       # rows built from their pieces
    mean_fallback: int = 0    # decompose asked, but the token had no pieces below from_rows

    def message(self) -> str:
        heads = "input embedding (tied output)" if self.tied else "input and output embeddings"
        detail = {"decompose": f"{self.decomposed} rows from their pieces, {self.mean_fallback} "
                               f"rows the mean (no pieces)",
                  "random": "the model's own random initialisation"}.get(
                      self.init, "every new row = mean of the old rows")
        return (f"resizing {heads}: {self.from_rows} -> {self.to_rows} rows "
                f"(+{self.to_rows - self.from_rows}); init {self.init} ({self.why}): {detail}")


def piece_ids(model_tokenizer, token: str, limit: int) -> list[int]:
    """Ids of the pieces the model's tokenizer splits `token` (a vocabulary string such as
    '▁孙悟空' or 'Ġworld') into, using its BPE/unigram model directly (no normaliser or
    pre-tokenizer, so the piece boundaries are the token's own); [] if any piece is >= limit."""
    backend = getattr(model_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = [t.id for t in backend.model.tokenize(token)]
    else:  # a slow tokenizer: through text
        text = model_tokenizer.convert_tokens_to_string([token])
        ids = model_tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(model_tokenizer, "unk_token_id", None)
    if not ids or max(ids) >= limit or (unk is not None and unk in ids and token != model_tokenizer.unk_token):
        return []  # no pieces, or an unknown piece: the caller falls back to the mean
    return ids


def _gathered(params, zero3: bool):
    if not zero3:
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def grow_embeddings(model, rows: int, *, init: str, why: str, model_tokenizer=None, tokenizer=None,
                    zero3: bool = False, log_it: bool = True) -> Resize | None:
    """Grow the embeddings to `rows` and initialise the new rows; None when nothing grows."""
    from trainer.model import embedding_rows
    old = embedding_rows(model)
    if rows <= old:
        return None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    model.resize_token_embeddings(rows, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out = None if tied else model.get_output_embeddings().weight
    resize = Resize(from_rows=old, to_rows=rows, init=init, why=why, tied=tied)
    with _gathered([p for p in (emb, out) if p is not None], zero3):
        for weight in (emb, out):
            if weight is None or weight.numel() == 0 or init == "random":
                continue  # random: --from_scratch keeps the model's own initialisation
            mean = weight[:old].float().mean(dim=0)
            weight[old:] = mean.to(weight.dtype)
            if init != "decompose":
                continue
            ids_to_tokens = {i: t for t, i in tokenizer.get_vocab().items()}
            done = fallback = 0
            for new_id in range(old, rows):
                token = ids_to_tokens.get(new_id)
                pieces = piece_ids(model_tokenizer, token, old) if token is not None else []
                if pieces:
                    weight[new_id] = weight[pieces].float().mean(dim=0).to(weight.dtype)
                    done += 1
                else:
                    fallback += 1
            resize.decomposed, resize.mean_fallback = done, fallback
    if hasattr(model.config, "vocab_size"):
        model.config.vocab_size = rows
    if log_it:
        log.info("%s", resize.message())
    return resize


def new_row_ids(tokenizer, *, base_len: int, added_ids: list[int]) -> list[int]:
    """Token ids the model has never trained: beyond its own tokenizer, plus added tokens."""
    return sorted(set(range(base_len, len(tokenizer))) | set(added_ids))


def _names(model) -> tuple[str, str | None]:
    from trainer.model import _module_name
    emb = _module_name(model, model.get_input_embeddings())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = None if tied or model.get_output_embeddings() is None else \
        _module_name(model, model.get_output_embeddings())
    return emb, head


def peft_supports_trainable_tokens() -> bool:
    from peft import LoraConfig
    return "trainable_token_indices" in {f.name for f in dataclasses.fields(LoraConfig)}


def new_row_lora_settings(model, settings: dict, new_ids: list[int], *, user_config: bool,
                          zero3: bool) -> tuple[dict, str | None]:
    """LoRA settings that train the new rows, and the one log line saying how (None: no new rows).

    A user config that names modules_to_save or trainable_token_indices is kept as written; if it
    leaves new rows untrained, a warning says how many."""
    if not new_ids:
        return settings, None
    cfg = dict(settings)
    emb, head = _names(model)
    modules = [emb] + ([head] if head else [])
    if user_config and (cfg.get("modules_to_save") or cfg.get("trainable_token_indices")):
        untrained = untrained_rows(cfg, modules, new_ids)
        if untrained:
            detail = ", ".join(f"{m}: {n} rows" for m, n in untrained.items())
            log.warning("the LoRA config leaves %d new token rows untrained (%s): they stay at "
                        "their initial values. Drop modules_to_save/trainable_token_indices from "
                        "it to train them, or list %s there.", sum(untrained.values()), detail,
                        " and ".join(modules))
            return cfg, None
        return cfg, f"new token rows: trained as the LoRA config says ({len(new_ids)} rows)"
    if peft_supports_trainable_tokens() and not (zero3 and not torch.cuda.is_available()):
        cfg["trainable_token_indices"] = {m: list(new_ids) for m in modules}
        how = (f"peft trainable_token_indices on {' and '.join(modules)} ({len(new_ids)} rows"
               f"{', tied output' if head is None else ''})")
    else:
        why = ("ZeRO-3 on CPU (peft gathers trainable-token rows on CUDA only)"
               if peft_supports_trainable_tokens() else "this peft has no trainable_token_indices")
        cfg["modules_to_save"] = list(dict.fromkeys(list(cfg.get("modules_to_save") or []) + modules))
        how = f"modules_to_save {modules} (whole matrices; {why})"
    return cfg, f"new token rows ({len(new_ids)}) trained with LoRA via {how}"


def untrained_rows(cfg: dict, modules: list[str], new_ids: list[int]) -> dict[str, int]:
    """{embedding module: number of new rows no trainable parameter covers}."""
    saved = set(cfg.get("modules_to_save") or [])
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    tti = cfg.get("trainable_token_indices") or {}
    if isinstance(tti, list):  # a bare list targets the input embedding
        tti = {modules[0]: tti}
    out = {}
    for m in modules:
        if m in saved or m in targets:
            continue
        missing = set(new_ids) - set(tti.get(m, []))
        if missing:
            out[m] = len(missing)
    return out


def resize_like_training(model, ckpt_resolved: dict | None, *, rows: int, model_tokenizer=None,
                         tokenizer=None) -> Resize | None:
    """Export/generate: grow a base model exactly as training did (same rows, same init)."""
    resize = ((ckpt_resolved or {}).get("vocab") or {}).get("resize") or {}
    init = resize.get("init", "mean")
    if init == "decompose" and (model_tokenizer is None or tokenizer is None):
        init = "mean"
    return grow_embeddings(model, rows, init=init, why="as in training", log_it=False,
                           model_tokenizer=model_tokenizer, tokenizer=tokenizer)


@dataclasses.dataclass
class VocabPlan:
    """What the trainer knows about vocabularies before the model loads."""
    model_tokenizer: object | None   # the model's own tokenizer (None: unknown)
    base_len: int                    # tokens the model was trained with (new ids start here)
    init: str
    why: str
    source: str                      # where the training tokenizer came from

    def record(self, tokenizer, resize: Resize | None, lora_rows: str | None) -> dict:
        """resolved_config.json["vocab"]."""
        return {"tokenizer_source": self.source, "model_tokenizer_len": (
                    self.base_len if self.model_tokenizer is not None else None),
                "tokenizer_len": len(tokenizer) if tokenizer is not None else None,
                "new_token_init": self.init, "resize": dataclasses.asdict(resize) if resize else None,
                "lora_new_rows": lora_rows}


def plan_vocab(*, model_path: str, tokenizer_path: str | None, tokenizer, tokenizer_source: str,
               model_vocab_size: int | None, requested_init: str, from_scratch: bool) -> VocabPlan:
    """Check --tokenizer_path against the model's tokenizer and choose the new-row init.

    `tokenizer` is the training tokenizer as loaded (before manifest/--add_tokens additions)."""
    from trainer.model import load_training_tokenizer
    if tokenizer is None:
        return VocabPlan(None, model_vocab_size or 0, "none", "no tokenizer", tokenizer_source)
    same = tokenizer_source == str(model_path)
    model_tok = tokenizer if same else load_training_tokenizer(model_path)
    if model_tok is not None and not same and not from_scratch:
        check_extends(model_tok, tokenizer, model_path=str(model_path),
                      tokenizer_path=str(tokenizer_path or tokenizer_source))
    if from_scratch:
        return VocabPlan(None, 0, "random", "--from_scratch: every row is freshly initialised",
                         tokenizer_source)
    if model_tok is not None and model_vocab_size is not None and len(model_tok) > model_vocab_size:
        # today's implicit case: a bigger tokenizer was copied beside the model
        log.warning("the tokenizer in %s has %d tokens but the model has %d embedding rows: the "
                    "model's original tokenizer is unknown, so new rows cannot be decomposed "
                    "(pass the original as --model_path's tokenizer and the bigger one as "
                    "--tokenizer_path)", model_path, len(model_tok), model_vocab_size)
        init, why = resolve_init(requested_init, None)
        return VocabPlan(None, model_vocab_size, init, why, tokenizer_source)
    init, why = resolve_init(requested_init, model_tok)
    base = len(model_tok) if model_tok is not None else (model_vocab_size or len(tokenizer))
    return VocabPlan(model_tok, base, init, why, tokenizer_source)
