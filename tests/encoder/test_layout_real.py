"""Golden token layouts on the real tokenizers in ../shared/tokenizers (skipped when absent)."""

from __future__ import annotations

import pytest

from encoder.document_encoder import DocumentEncoder, EncoderSpec
from encoder_testlib import check_layout, real_tokenizer, shared_tokenizer_path

# name -> (adds BOS by convention, template used for the 3-turn chat)
TOKENIZERS = {"llama2": (True, "llama2"), "gpt2": (False, "alpaca"), "qwen3": (False, "chat"),
              "internlm": (True, "llama2"), "llama3": (True, "alpaca")}
QA = [{"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "Paris is the capital of France."}]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye, see you."}]


def make_encoder(name: str, template: str, encode_type: str = "qa", max_length: int = 256):
    spec = EncoderSpec(shared_tokenizer_path(name), encode_type, max_length, template=template)
    return DocumentEncoder(spec, tokenizer=real_tokenizer(name))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_qa_layout_template_none(name):
    enc = make_encoder(name, "none")
    out = enc.encode_rows([QA])[0]
    assert enc.policy.adds_bos == TOKENIZERS[name][0]
    check_layout(enc.tok, out, [QA[1]["content"]], end_id=enc.tok.eos_token_id,
                 expect_bos=TOKENIZERS[name][0])
    # template none: prompt = q tokens, answer = a tokens + EOS, nothing else
    q = enc.tok(QA[0]["content"], add_special_tokens=False)["input_ids"]
    a = enc.tok(QA[1]["content"], add_special_tokens=False)["input_ids"]
    assert out.ids.tolist() == enc.prefix + q + a + [enc.tok.eos_token_id]
    assert out.mask.tolist() == [False] * (len(enc.prefix) + len(q)) + [True] * (len(a) + 1)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_three_turn_chat_layout(name):
    template = TOKENIZERS[name][1]
    enc = make_encoder(name, template, encode_type="chat")
    out = enc.encode_rows([CHAT])[0]
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    check_layout(enc.tok, out, answers, end_id=enc.end_ids[0], expect_bos=TOKENIZERS[name][0],
                 end_is_eos_only=template != "chat")
    loss_text = enc.tok.decode(out.ids[out.mask], skip_special_tokens=True)
    assert [a for a in answers if a not in loss_text] == []


LLAMA2_ALPACA_GOLDEN = [  # <s> "▁Below ▁is ... ### ▁Inst ruction :\n What ... ▁Response :\n" | "▁Paris ... ." </s>
    1, 13866, 338, 385, 15278, 393, 16612, 263, 3414, 29889, 14350, 263, 2933, 393, 7128, 2486,
    1614, 2167, 278, 2009, 29889, 13, 13, 2277, 29937, 2799, 4080, 29901, 13, 5618, 338, 278,
    7483, 310, 3444, 29973, 13, 13, 2277, 29937, 13291, 29901, 13,
    3681, 338, 278, 7483, 310, 3444, 29889, 2]


def test_golden_llama2_alpaca():
    enc = make_encoder("llama2", "alpaca")
    out = enc.encode_rows([QA])[0]
    assert out.ids.tolist() == LLAMA2_ALPACA_GOLDEN
    assert out.mask.tolist() == [False] * 43 + [True] * 8      # "▁Paris ... ." + </s>


def test_golden_qwen3_chat_template():
    enc = make_encoder("qwen3", "chat")
    out = enc.encode_rows([QA])[0]
    tok = enc.tok
    assert tok.convert_ids_to_tokens(out.ids[:3].tolist()) == ["<|im_start|>", "user", "Ċ"]
    assert enc.end_ids == [151645]                              # <|im_end|>, trained
    # this template's generation prompt ends "<|im_start|>assistant\n<think>\n": the model must
    # produce the rest ("\n</think>\n\n" + answer + <|im_end|>), so that is what is trained
    assert tok.decode(out.ids[out.mask]) == "\n</think>\n\nParis is the capital of France.<|im_end|>"
    assert tok.decode(out.ids[~out.mask]) == tok.apply_chat_template(QA[:1], tokenize=False,
                                                                      add_generation_prompt=True) + "\n"
    assert tok.decode(out.ids) == tok.apply_chat_template(QA, tokenize=False)   # byte for byte


@pytest.mark.parametrize("name,literal", [("llama2", "</s>"), ("qwen3", "<|im_end|>")])
def test_control_token_strings_in_data_stay_text(name, literal):
    enc = make_encoder(name, "chat" if name == "qwen3" else "none")
    row = [{"role": "user", "content": f"What does {literal} do?"},
           {"role": "assistant", "content": f"In this data {literal} is just text."}]
    clean = enc.encode_rows([QA])[0]
    out, after = enc.encode_rows([row, QA])
    end = enc.end_ids[0]
    spans = [i for i in range(len(out.ids)) if out.ids[i] == end and out.mask[i]]
    assert spans == [len(out.ids) - 1 - (name == "qwen3")]      # only the real end-of-turn
                                                                # (Qwen: then the template's "\n")
    assert literal in enc.tok.decode(out.ids[out.mask])
    # the split-special re-encode must not leak into later rows or into the template markup
    assert after.ids.tolist() == clean.ids.tolist() == enc.encode_rows([QA])[0].ids.tolist()
    if name == "qwen3":
        assert enc.tok.convert_ids_to_tokens(int(out.ids[0])) == "<|im_start|>"


def test_chat_template_missing_is_an_error():
    from encoder.errors import TemplateError
    with pytest.raises(TemplateError, match="no chat_template"):
        make_encoder("llama2", "chat", encode_type="chat")


def test_chatml_without_tokens_suggests_add_tokens():
    from encoder.errors import TemplateError
    with pytest.raises(TemplateError, match="--add_tokens"):
        make_encoder("gpt2", "chatml", encode_type="chat")


def test_chat_template_answer_text_also_in_prompt():
    """An answer that also occurs in the prompt ("3") must be located in the answer slot."""
    enc = make_encoder("qwen3", "chat", encode_type="chat")
    tok = enc.tok
    rows = [[{"role": "user", "content": "Output 1, 2 or 3."}, {"role": "assistant", "content": "3"}],
            [{"role": "user", "content": "Say 4"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "4 again"}, {"role": "assistant", "content": "4"}]]
    one, two = enc.encode_rows(rows)
    assert tok.decode(one.ids[one.mask]) == "\n</think>\n\n3<|im_end|>"
    assert tok.decode(one.ids[~one.mask]).endswith("Output 1, 2 or 3.<|im_end|>\n"
                                                   "<|im_start|>assistant\n<think>\n\n")
    assert tok.decode(two.ids[two.mask]) == "4<|im_end|>\n</think>\n\n4<|im_end|>"
    assert tok.decode(two.ids[~two.mask]).count("4") == 2     # both user "4"s stay prompt


@pytest.mark.parametrize("name,dtype", [("qwen3", "int32"), ("gpt2", "uint16"), ("llama2", "uint16"),
                                        ("llama3", "int32"), ("internlm", "int32")])
def test_auto_dtype_from_real_len(name, dtype):
    from encoder.tokenizer_policy import choose_dtype
    assert choose_dtype("auto", vocab_size=len(real_tokenizer(name))) == dtype


@pytest.mark.parametrize("name, template", [("llama2", "alpaca"), ("qwen3", "chat"),
                                            ("gpt2", "none"), ("qwen3", "chatml"),
                                            ("llama3", "llama2")])
def test_inference_prompt_is_the_training_prefix(name, template):
    """`encode_prompt` (used by trainer.generate) yields exactly the untrained prefix of the
    encoded training sample, for one turn and for a conversation with history."""
    enc = make_encoder(name, template)
    for history in (QA[:1], CHAT[:-1]):
        prompt = enc.encode_prompt(history)
        full = enc.encode_rows([history + [CHAT[-1]]])[0]
        assert full.ids[:len(prompt)].tolist() == prompt
        assert not full.mask[len(prompt) - 1] and full.mask[len(prompt)]  # answer starts here
        if len(history) == 1:
            assert not full.mask[:len(prompt)].any()
