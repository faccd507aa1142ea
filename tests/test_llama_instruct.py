"""Instruction data: ChatML or plain layout, loss on the responses only, clear errors; one
LoRA fine-tuning run on Llama lowers the masked loss."""
import json
import pathlib

import pytest

import tinylora as tl
from tinylora import lora
from tinylora.backend import np
from tinylora.data.instruct import IGNORE, InstructionData, encode_record, load_jsonl
from tinylora.models import BPETokenizer, Llama

BPE = pathlib.Path(__file__).parent / "fixtures" / "llama" / "bpe"
QWEN = BPETokenizer.from_file(BPE / "qwen2.json")      # has <|im_start|>: ChatML
LLAMA2 = BPETokenizer.from_file(BPE / "llama2.json")   # has neither: plain template, </s>


def learned_text(tok, ids, targets):
    return tok.decode([t for t in targets if t != IGNORE], skip_special_tokens=False)


def test_chatml_learns_only_the_response():
    ids, tg = encode_record({"prompt": "What is 2+2?", "response": "4, of course."}, QWEN)
    assert len(ids) == len(tg)
    text = QWEN.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert learned_text(QWEN, ids, tg) == "4, of course.<|im_end|>"
    # targets are next tokens: where learned, target[t] == ids[t + 1]
    full = ids + [QWEN.encode("\n", add_special_tokens=False)[-1]]
    assert all(t == full[i + 1] for i, t in enumerate(tg) if t != IGNORE)


def test_messages_learn_every_assistant_turn():
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}
    ids, tg = encode_record(rec, QWEN)
    assert learned_text(QWEN, ids, tg) == "Hello!<|im_end|>Bye!<|im_end|>"


def test_plain_template_with_bos_and_eos():
    ids, tg = encode_record({"prompt": "Name a color.", "response": "Blue"}, LLAMA2)
    assert ids[0] == LLAMA2.token_to_id("<s>")
    assert LLAMA2.decode(ids) == "### Instruction:\nName a color.\n\n### Response:\nBlue"
    assert learned_text(LLAMA2, ids, tg) == "Blue</s>"
    assert tg[-1] == LLAMA2.token_to_id("</s>")


@pytest.mark.parametrize("rec,msg", [
    ({"prompt": "only a question"}, "no response"),
    ({"prompt": "q", "response": ""}, "no response"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no response"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"text": "hi"}, "'prompt' and 'response'"),
])
def test_bad_records(rec, msg):
    with pytest.raises(ValueError, match=msg):
        encode_record(rec, QWEN, where="data.jsonl: record 3")


def test_too_long_and_bad_lines(tmp_path):
    with pytest.raises(ValueError, match="longer than the context of 8"):
        encode_record({"prompt": "a long question " * 5, "response": "yes"}, QWEN, max_len=8)
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(p)


def test_lora_finetune_on_instructions(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"prompt": f"Say {w}.", "response": f"{w} {w} {w}"} for w in ("cat", "dog", "sun", "sky")]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    data = InstructionData.from_jsonl(p, QWEN, max_len=64)
    idx, tgt = data.batch(range(4))
    assert idx.shape == tgt.shape == (4, max(len(i) for i, _ in data.examples))
    assert all(tgt[r, len(data.examples[r][0]):].tolist() == [IGNORE] * (idx.shape[1] - len(data.examples[r][0]))
               for r in range(4))
    tl.manual_seed(0)
    model = Llama(tl.models.LlamaConfig(vocab_size=QWEN.vocab_size, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, initializer_range=0.3))
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    opt = tl.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-2)
    losses = []
    for _ in range(15):
        _, loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert np.isfinite(losses).all()
