"""LoRA and QLoRA on Llama: PEFT adapters load with PEFT's outputs, adapters tinylora writes
give in PEFT (over transformers) the outputs they give here, on a float and a 4-bit base
(PEFT over bitsandbytes' Linear4bit on the CPU); "all-linear" leaves lm_head alone."""
import pathlib

import pytest

import tinylora as tl
from tinylora import backend, lora, quant
from tinylora.backend import np
from tinylora.io import load_safetensors
from tinylora.models import Llama

FIX = pathlib.Path(__file__).parent / "fixtures" / "llama"
GQA, Q4 = FIX / "llama_gqa", FIX / "llama_q4"   # llama_q4: >= 64 wide, as bitsandbytes' CPU path needs
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ref(quantized):
    return load_safetensors((Q4 if quantized else GQA) / "reference.safetensors")[0]


def gap(model, key, quantized=False):
    r = ref(quantized)
    with tl.no_grad():
        logits, _ = model.eval()(r["input_ids"])
    return np.abs(backend.to_numpy(logits.data) - r[key]).max()


def base(quantized=False):
    m = Llama.from_hf(Q4 if quantized else GQA)
    if quantized:   # NF4 with double quantization: bitsandbytes' bytes (the references' base)
        quant.quantize_model(m, double_quant=True, print_fn=None)
    return m


@pytest.mark.parametrize("quantized", [False, True])
def test_peft_adapter_loads_with_peft_outputs(quantized):
    m = base(quantized)
    if quantized:
        assert gap(m, "q4_logits", True) < 1e-4       # tinylora's NF4 base = bitsandbytes'
    cfg = lora.load_adapter(m, (Q4 if quantized else GQA) / "peft_adapter")
    assert sorted(cfg.target_modules) == sorted(PROJ)
    assert gap(m, "q4_lora_logits" if quantized else "lora_logits", quantized) < 1e-4


@pytest.mark.parametrize("quantized", [False, True])
def test_tinylora_adapter_gives_peft_outputs(quantized, tmp_path):
    """tinylora_adapter/ was written by lora.save_adapter; PEFT's logits with it are stored."""
    m = base(quantized)
    folder = Q4 if quantized else GQA
    lora.load_adapter(m, folder / "tinylora_adapter", check_base=not quantized)
    assert gap(m, "q4_tinylora_lora_logits" if quantized else "tinylora_lora_logits",
               quantized) < 1e-4
    # today's writer still writes what PEFT read: same keys, same tensors
    lora.save_adapter(m, tmp_path / "again")
    old = load_safetensors(folder / "tinylora_adapter" / "adapter_model.safetensors")[0]
    new = load_safetensors(tmp_path / "again" / "adapter_model.safetensors")[0]
    assert old.keys() == new.keys()
    assert all(np.array_equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize("folder", ["llama_gqa", "qwen2_tied"])
def test_all_linear_takes_the_seven_projections_not_lm_head(folder):
    m = Llama.from_hf(FIX / folder)
    lora.inject(m, lora.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = sorted(p for p, mod in m.named_modules() if isinstance(mod, lora.LoRALinear))
    want = sorted(f"model.layers.{i}.{'self_attn' if n in PROJ[:4] else 'mlp'}.{n}"
                  for i in range(2) for n in PROJ)
    assert wrapped == want
    assert not isinstance(m.lm_head, lora.LoRALinear)


def test_lora_by_name_trains_only_the_adapter():
    m = base()
    lora.inject(m, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2
    ids = ref(False)["input_ids"]
    opt = tl.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(5):
        _, loss = m(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
