"""One LoRA and one QLoRA training step at a tiny size: compiles (and caches) the CuPy kernels
that the GPU tests and benchmark use. Run by scripts/gpu_check.sh before the tests."""
import tinylora as tl
from tinylora import lora, quant
from tinylora.models import GPT, GPTConfig
from tinylora.optim import AdamW
for q in (False, True):
    tl.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=64, dropout=0.1))
    if q:
        quant.quantize_model(m, print_fn=None)
    lora.inject(m, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    opt = AdamW([p for p in m.parameters() if p.requires_grad])
    x = tl.tensor(tl.backend.xp.zeros((2, 16), dtype="int64"))
    _, loss = m(x, x)
    loss.backward()
    opt.step()
print("gpu_check: warm-up done")
