"""Per-pair losses and rewards of trainer/preference.py equal TRL 1.16's own code, in fp32 on CPU,
on the same model and pairs (<= 1e-5):
  DPO (sigmoid) and IPO: `DPOTrainer._compute_loss` on one pair at a time (its loss is then the
      pair's loss, its logged rewards/logps the pair's), policy and reference forwards by TRL;
  SimPO: `CPOTrainer.cpo_loss(loss_type="simpo")` and ORPO's odds-ratio term:
      `ORPOTrainer.odds_ratio_loss`, fed log-probs from TRL's `get_batch_logps` on TRL-style
      padded batches; ORPO's TOTAL loss (NLL + odds ratio): `ORPOTrainer.get_batch_loss_metrics`.
Our side runs the trainer's path: pair collate (packed and unpacked, flattened sdpa_varlen
attention) -> `sequence_logps` -> `pair_losses`. Run with -s to see the numbers."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from preference_testlib import make_pairs
from shardfmt import Sample
from trainer.preference import ObjectiveSettings, collate_pairs, pair_losses, sequence_logps
from trainer_testlib import build_model, build_tokenizer

TOL = 1e-5
NUM_PAIRS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    from trainer.attention import register_varlen_sdpa
    out = tmp_path_factory.mktemp("trl")
    tok = build_tokenizer(out / "tok")
    build_model(out / "ref", vocab_size=len(tok))
    tok.save_pretrained(str(out / "ref"))
    torch.manual_seed(1)  # the policy: the reference moved a little, so ratios are not zero
    policy = AutoModelForCausalLM.from_pretrained(out / "ref", dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained(out / "policy")
    register_varlen_sdpa()
    models = {name: AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32,
                                                         attn_implementation="sdpa_varlen").eval()
              for name in ("policy", "ref")}
    return {"dir": out, "tok": tok, "pairs": make_pairs(NUM_PAIRS, seed=3), "models": models}


def _samples(pairs, per_sample: int) -> list[Sample]:
    out = []
    for k in range(0, len(pairs), per_sample):
        ids, masks, lens = [], [], []
        for chosen, rejected, p in pairs[k:k + per_sample]:
            for seq in (chosen, rejected):
                m = np.zeros(len(seq), bool)
                m[p:] = True
                ids.append(seq)
                masks.append(m)
                lens.append(len(seq))
        out.append(Sample(np.concatenate(ids), np.concatenate(masks), np.array(lens, np.int32)))
    return out


def _ours(setup, per_sample: int) -> dict:
    """Per-sequence (sum logps, counts) under policy and reference, the trainer's way."""
    from trainer.data import model_inputs
    batch = collate_pairs([(s, None) for s in _samples(setup["pairs"], per_sample)], pad_id=3,
                          flatten=True)
    inputs = model_inputs(batch, "sdpa_varlen", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        pol, counts = sequence_logps(setup["models"]["policy"], inputs, batch)
        ref, _ = sequence_logps(setup["models"]["ref"], inputs, batch)
    return {"pol": pol, "ref": ref, "counts": counts}


def _our_losses(logps: dict, settings: ObjectiveSettings) -> dict:
    pol, ref, n = logps["pol"], logps["ref"], logps["counts"]
    return pair_losses(settings, chosen_logps=pol[0::2], rejected_logps=pol[1::2],
                       chosen_lens=n[0::2], rejected_lens=n[1::2], ref_chosen_logps=ref[0::2],
                       ref_rejected_logps=ref[1::2])


@pytest.fixture(scope="module")
def ours(setup):
    return {k: _ours(setup, k) for k in (1, 3)}   # unpacked, and 3 pairs per packed sample


def _report(name, rows):
    worst = max(abs(a - b) for row in rows for a, b in row[1:])
    print(f"\n{name}: max |ours - TRL| = {worst:.2e} over {len(rows)} pairs")
    for k, *cols in rows:
        print(f"  pair {k}: " + "  ".join(f"{a:+.7f}/{b:+.7f}" for a, b in cols))
    return worst


@pytest.mark.parametrize("objective, trl_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trl_dpo_trainer(setup, ours, objective, trl_type, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from transformers import AutoModelForCausalLM
    beta = 0.1
    d = setup["dir"]
    policy = AutoModelForCausalLM.from_pretrained(d / "policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(d / "ref", dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": "w1 w2", "chosen": " w3", "rejected": " w9"}] * 2)
    cfg = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, loss_type=[trl_type],
                    beta=beta, per_device_train_batch_size=1, bf16=False, fp16=False,
                    max_length=None)
    trl = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=ds,
                     processing_class=setup["tok"])
    trl.model.eval()
    rows = []
    for per_sample in (1, 3):
        mine = _our_losses(ours[per_sample], ObjectiveSettings(objective, beta=beta))
        for k, (chosen, rejected, p) in enumerate(setup["pairs"]):
            ex = {"prompt_ids": chosen[:p].tolist(), "chosen_ids": chosen[p:].tolist(),
                  "rejected_ids": rejected[p:].tolist()}
            with torch.no_grad():
                loss = float(trl._compute_loss(trl.model, trl.data_collator([ex]), False))
            m = {key: v[-1] for key, v in trl._metrics["eval"].items()}
            rows.append((k, (float(mine["loss"][k]), loss),
                         (float(mine["chosen_rewards"][k]), m["rewards/chosen"]),
                         (float(mine["rejected_rewards"][k]), m["rewards/rejected"]),
                         (float(mine["chosen_logps"][k]), m["logps/chosen"]),
                         (float(mine["rejected_logps"][k]), m["logps/rejected"])))
    assert _report(f"{objective} (loss, rewards c/r, logps c/r; unpacked then packed)", rows) <= TOL


def _trl_avg_logps(setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Average log-probs of every chosen and rejected response by TRL's get_batch_logps on a
    right-padded batch (prompt labels -100), policy forward with plain sdpa + attention mask."""
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOTrainer
    model = AutoModelForCausalLM.from_pretrained(setup["dir"] / "policy", dtype=torch.float32).eval()
    out = []
    for side in (0, 1):
        seqs = [(pair[side], pair[2]) for pair in setup["pairs"]]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), 3)
        labels = torch.full((len(seqs), width), -100)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, (s, p) in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            labels[b, p:len(s)] = torch.tensor(s[p:])
            attn[b, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits
        out.append(CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True))
    return out[0], out[1]


def test_simpo_equals_trl_cpo_simpo(setup, ours):
    from trl.experimental.cpo import CPOTrainer
    beta, gamma = 2.0, 0.5
    avg_c, avg_r = _trl_avg_logps(setup)
    ns = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                               label_smoothing=0.0,
                               accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, rc, rr = CPOTrainer.cpo_loss(ns, avg_c, avg_r)
    rows = []
    for per_sample in (1, 3):
        mine = _our_losses(ours[per_sample],
                           ObjectiveSettings("simpo", beta=beta, simpo_gamma=gamma))
        for k in range(NUM_PAIRS):
            rows.append((k, (float(mine["loss"][k]), float(losses[k])),
                         (float(mine["chosen_rewards"][k]), float(rc[k])),
                         (float(mine["rejected_rewards"][k]), float(rr[k]))))
    assert _report("simpo (loss, rewards c/r)", rows) <= TOL


def _trl_orpo_batch(pairs, pad_id: int) -> dict:
    """TRL ORPO's tokenized batch: right-padded chosen/rejected ids, attention masks, labels with
    the prompt and the pads at -100 (what its collator builds from prompt/chosen/rejected ids)."""
    batch = {}
    for side, name in ((0, "chosen"), (1, "rejected")):
        width = max(len(pair[side]) for pair in pairs)
        ids = torch.full((len(pairs), width), pad_id)
        labels = torch.full((len(pairs), width), -100)
        attn = torch.zeros((len(pairs), width), dtype=torch.long)
        for b, pair in enumerate(pairs):
            s, p = pair[side], pair[2]
            ids[b, :len(s)] = torch.tensor(s)
            labels[b, p:len(s)] = torch.tensor(s[p:])
            attn[b, :len(s)] = 1
        batch.update({f"{name}_input_ids": ids, f"{name}_attention_mask": attn,
                      f"{name}_labels": labels})
    return batch


def _our_orpo(setup, settings, per_sample: int, micro_pairs: int) -> dict:
    """The trainer's ORPO path: micro-batches of `micro_pairs` pairs (packed `per_sample` pairs per
    sample), NLL scaled by the global pairs / chosen tokens, as `PreferenceRun.train_step` does."""
    from trainer.data import model_inputs
    from trainer.preference import chosen_nll_from_logits, logps_from_logits
    samples = _samples(setup["pairs"], per_sample)
    per_micro = micro_pairs // per_sample
    batches = [collate_pairs([(s, None) for s in samples[k:k + per_micro]], pad_id=3, flatten=True)
               for k in range(0, len(samples), per_micro)]
    scale = sum(b["num_pairs"] for b in batches) / sum(b["chosen_tokens"] for b in batches)
    outs = []
    with torch.no_grad():
        for batch in batches:
            logits = setup["models"]["policy"](**model_inputs(batch, "sdpa_varlen", torch.float32,
                                                              torch.device("cpu"))).logits
            sums, n = logps_from_logits(logits, batch)
            nll, _ = chosen_nll_from_logits(logits, batch)
            outs.append(pair_losses(settings, chosen_logps=sums[0::2], rejected_logps=sums[1::2],
                                    chosen_lens=n[0::2], rejected_lens=n[1::2], chosen_nll=nll,
                                    nll_scale=scale))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def test_orpo_total_loss_equals_trl_orpo_trainer(setup, tmp_path):
    """TRL's whole ORPO loss (`ORPOTrainer.get_batch_loss_metrics`: chosen NLL over prompt and
    response, token mean over the batch, minus alpha * mean logsigmoid(log odds)) on the 6 pairs
    as one batch == the mean of our per-pair losses, in one micro-batch or split into micro-batches
    (global normalisation), packed or not; per-pair odds-ratio terms and rewards too."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    alpha = 0.1
    policy = AutoModelForCausalLM.from_pretrained(setup["dir"] / "policy", dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": "w1 w2", "chosen": " w3", "rejected": " w9"}] * 2)
    cfg = ORPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=alpha,
                     per_device_train_batch_size=len(setup["pairs"]), bf16=False, fp16=False,
                     max_length=64)
    trl = ORPOTrainer(model=policy, args=cfg, train_dataset=ds, processing_class=setup["tok"])
    trl.model.eval()
    with torch.no_grad():
        trl_loss, metrics = trl.get_batch_loss_metrics(
            trl.model, _trl_orpo_batch(setup["pairs"], trl.padding_value))
    avg_c, avg_r = _trl_avg_logps(setup)
    ns = types.SimpleNamespace(beta=alpha,
                               accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    or_losses, rc, rr, _, _ = ORPOTrainer.odds_ratio_loss(ns, avg_c, avg_r)
    settings = ObjectiveSettings("orpo", orpo_alpha=alpha)
    rows, totals = [], []
    for per_sample, micro_pairs in ((1, 6), (1, 2), (3, 3), (3, 6)):
        mine = _our_orpo(setup, settings, per_sample, micro_pairs)
        totals.append((f"{per_sample} pair(s)/sample, {micro_pairs} pairs/micro-batch",
                       float(mine["loss"].mean()), float(trl_loss)))
        for k in range(NUM_PAIRS):
            rows.append((k, (float(mine["odds_ratio_loss"][k]), -float(or_losses[k])),
                         (float(mine["chosen_rewards"][k]), float(rc[k])),
                         (float(mine["rejected_rewards"][k]), float(rr[k]))))
    worst_total = max(abs(a - b) for _, a, b in totals)
    print(f"\norpo TOTAL loss (NLL + odds ratio): max |ours - TRL| = {worst_total:.2e} "
          f"(TRL {float(trl_loss):.7f}, nll_loss {metrics['nll_loss']:.7f})")
    for name, a, b in totals:
        print(f"  {name}: {a:+.7f}/{b:+.7f}")
    assert worst_total <= TOL
    assert _report("orpo (odds-ratio term, rewards c/r)", rows) <= TOL


def test_sft_weight_and_label_smoothing(setup, ours):
    """cDPO: eps-weighted mix of both label directions; --sft_weight adds the chosen NLL/token."""
    import torch.nn.functional as F
    logps = ours[1]
    base = _our_losses(logps, ObjectiveSettings("dpo", beta=0.1))
    smooth = _our_losses(logps, ObjectiveSettings("dpo", beta=0.1, label_smoothing=0.2,
                                                  sft_weight=0.5))
    pol, ref, n = logps["pol"], logps["ref"], logps["counts"]
    z = 0.1 * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))
    want = -0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z) + 0.5 * (-pol[0::2] / n[0::2])
    assert torch.allclose(smooth["loss"], want, atol=1e-6)
    assert torch.allclose(base["loss"], -F.logsigmoid(z), atol=1e-6)


def _trl_kto_reference(setup, tmp_path, examples, *, beta, w_d, w_u):
    """TRL 1.16's `KTOTrainer._compute_loss` on (prompts, completions, labels) as one batch, with
    KL_completion_ids rotated by one as its dataset map does: (loss, its logged metrics). Roles
    swapped (policy: "ref", reference: "policy"): for these weights the KL estimate is then
    positive, so the reference point z0 is not clamped to 0 and enters every loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer
    prompts, completions, labels = examples
    d = setup["dir"]
    policy = AutoModelForCausalLM.from_pretrained(d / "ref", dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(d / "policy", dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": "w1 w2", "completion": " w3", "label": True},
                            {"prompt": "w1 w2", "completion": " w9", "label": False}])
    cfg = KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=beta,
                    desirable_weight=w_d, undesirable_weight=w_u,
                    per_device_train_batch_size=len(prompts), bf16=False, fp16=False,
                    max_length=None)
    trl = KTOTrainer(model=policy, ref_model=ref_model, args=cfg, train_dataset=ds,
                     processing_class=setup["tok"])
    trl.model.eval()
    rows = [{"prompt_ids": p.tolist(), "completion_ids": c.tolist(),
             "KL_completion_ids": completions[(i - 1) % len(prompts)].tolist(), "label": lab}
            for i, (p, c, lab) in enumerate(zip(prompts, completions, labels))]
    with torch.no_grad():
        trl_loss = float(trl._compute_loss(trl.model, trl.data_collator(rows), False))
    return trl_loss, {key: v[-1] for key, v in trl._metrics["eval"].items()}


def test_kto_loss_equals_trl_kto_trainer(setup, tmp_path):
    """`kto_losses` (trainer/preference.py) on log-probs from the trainer's path (pair collate,
    packed: each sample's sequence beside its KL sequence, prompt i + completion i-1 by
    `kto_mismatched`) == TRL 1.16's `KTOTrainer._compute_loss` on the same 6 unpaired samples as
    one batch: loss (mean over samples), KL estimate, rewards/chosen and rewards/rejected."""
    from trainer.data import model_inputs
    from trainer.preference import kto_losses, kto_mismatched
    beta, w_d, w_u = 0.1, 1.3, 0.7
    prompts, completions, labels = _kto_examples(setup)
    kl_seqs = kto_mismatched(prompts, completions)
    samples = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seqs = [np.concatenate([p, c]), kl_seqs[i]]
        masks = [np.arange(len(x)) >= len(p) for x in seqs]
        samples.append(Sample(np.concatenate(seqs), np.concatenate(masks),
                              np.array([len(x) for x in seqs], np.int32)))
    batch = collate_pairs([(s, None) for s in samples], pad_id=3, flatten=True)
    inputs = model_inputs(batch, "sdpa_varlen", torch.float32, torch.device("cpu"))
    # roles swapped (policy: "ref", reference: "policy"): for these weights the KL estimate is
    # then positive, so the reference point z0 is not clamped to 0 and enters every loss
    with torch.no_grad():
        pol, _ = sequence_logps(setup["models"]["ref"], inputs, batch)
        ref, _ = sequence_logps(setup["models"]["policy"], inputs, batch)
    desirable = torch.tensor(labels)
    mine = kto_losses(logps=pol[0::2], ref_logps=ref[0::2], desirable=desirable,
                      kl_logps=pol[1::2], ref_kl_logps=ref[1::2], beta=beta,
                      desirable_weight=w_d, undesirable_weight=w_u)

    trl_loss, m = _trl_kto_reference(setup, tmp_path, (prompts, completions, labels), beta=beta,
                                     w_d=w_d, w_u=w_u)
    rows = [("loss", float(mine["loss"].mean()), trl_loss), ("kl", float(mine["kl"]), m["kl"]),
            ("rewards/chosen", float(mine["rewards"][desirable].mean()), m["rewards/chosen"]),
            ("rewards/rejected", float(mine["rewards"][~desirable].mean()),
             m["rewards/rejected"])]
    worst = max(abs(a - b) for _, a, b in rows)
    print(f"\nkto: max |ours - TRL| = {worst:.2e}  " +
          "  ".join(f"{k} {a:+.7f}/{b:+.7f}" for k, a, b in rows))
    assert float(mine["kl"]) > 0    # the policy moved: the KL reference point is not clamped
    assert worst <= TOL


class _Engine:
    """The bits of a DeepSpeed engine `KtoRun.train_step` calls, around a plain model: backward
    records the scaled losses (no optimizer step, so every micro-batch sees the same weights)."""

    def __init__(self, model):
        self.module, self.backwards = model, []

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss, scale_wrt_gas=True):
        self.backwards.append(float(loss.detach()))

    def step(self):
        pass

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.eval()   # keep dropout-free eval mode for the comparison


def _kto_run(setup, policy_name: str, ref_name: str, *, beta, w_d, w_u, mbs=2):
    from trainer.kto import KtoRun
    from trainer.preference import ObjectiveSettings as Settings
    args = types.SimpleNamespace(ref_model_path=None, model_path="unused", micro_batch_size=mbs,
                                 precomputed_ref_logps=False)
    info = types.SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0)
    ds = types.SimpleNamespace(manifests=[{"kto": {"sequence_max_length": 4096}}])
    run = KtoRun(Settings("kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u),
                 train_ds=ds, eval_ds=None, args=args, info=info, dtype=torch.float32,
                 attn="sdpa_varlen", flatten=True, pad_id=3)
    run.ref_model = setup["models"][ref_name]
    return run, _Engine(setup["models"][policy_name])


def _kto_examples(setup):
    labels = [True, False, True, True, False, False]
    prompts = [pair[0][:pair[2]] for pair in setup["pairs"]]
    completions = [pair[0 if lab else 1][pair[2]:] for pair, lab in zip(setup["pairs"], labels)]
    return prompts, completions, labels


def test_kto_step_equals_trl_kto_trainer(setup, tmp_path):
    """The trainer's whole kto step (`KtoRun.train_step`: unpaired collate, mismatched sequences
    over the step's examples, z0, per-example losses over the global count, TRL's metrics) on 6
    examples == TRL 1.16's `KTOTrainer._compute_loss` on them as one batch (its own collator,
    KL_completion_ids rotated by one as its dataset map does): loss, kl, rewards/chosen,
    rewards/rejected, rewards/margins, logps/chosen, logps/rejected; in one micro-batch of 6 or
    accumulated (3 x 2, 2 x 3), unpacked or packed (2 or 3 examples a sample)."""
    from trainer.kto import collate_unpaired
    beta, w_d, w_u = 0.1, 1.3, 0.7
    prompts, completions, labels = _kto_examples(setup)
    trl_loss, m = _trl_kto_reference(setup, tmp_path, (prompts, completions, labels), beta=beta,
                                     w_d=w_d, w_u=w_u)
    keys = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected")
    rows = []
    for per_sample, micro_examples in ((1, 6), (1, 2), (2, 6), (3, 3), (1, 3)):
        samples = []
        for k in range(0, 6, per_sample):
            seqs = [np.concatenate([p, c]) for p, c in zip(prompts[k:k + per_sample],
                                                          completions[k:k + per_sample])]
            masks = [np.arange(len(s)) >= len(p) for s, p in zip(seqs, prompts[k:k + per_sample])]
            samples.append((Sample(np.concatenate(seqs), np.concatenate(masks),
                                   np.array([len(s) for s in seqs], np.int32)),
                            np.array(labels[k:k + per_sample])))
        per_micro = micro_examples // per_sample
        micro = [collate_unpaired(samples[k:k + per_micro], pad_id=3, flatten=True)
                 for k in range(0, len(samples), per_micro)]
        run, engine = _kto_run(setup, "ref", "policy", beta=beta, w_d=w_d, w_u=w_u)  # as TRL's
        with torch.no_grad():
            loss, n = run.train_step(engine, micro)
        assert n == 6 and abs(sum(engine.backwards) - loss) < 1e-6   # what backward saw
        rows.append((f"{per_sample}/sample, {micro_examples}/micro-batch",
                     [(loss, trl_loss)] + [(run.last[k], m[k]) for k in keys]))
    worst = max(abs(a - b) for _, cols in rows for a, b in cols)
    print(f"\nkto step: max |ours - TRL| = {worst:.2e}  (loss, " + ", ".join(keys) + ")")
    for name, cols in rows:
        print(f"  {name}: " + "  ".join(f"{a:+.7f}/{b:+.7f}" for a, b in cols))
    assert m["kl"] > 0 and worst <= TOL
