"""The PyTorch side of the benchmarks: the same GPT as tinylora's, in eager PyTorch.

Same shapes, names and math as ``tinylora.models.GPT``: learned positions, pre-norm blocks,
GPT-2's tanh GELU, tied input/output embedding, float32; LoRA as a frozen Linear plus
``s · (x Aᵀ) Bᵀ``. ``TorchGPT.generate`` decodes with the KV cache tinylora's ``generate``
uses: preallocated (B, nh, capacity, hs) buffers written in place, the prompt once, then one
token per step. Imported only by the comparison scripts, and only when torch is installed;
the tinylora package itself never imports torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable rank-r update, as PEFT computes it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling


class Attention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, cache=None, past: int = 0):
        """cache: this layer's (k, v) buffers (B, nh, capacity, hs); the T new positions
        are written at [past, past + T) and attend to everything before them."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            kc, vc = cache
            end = past + T
            kc[:, :, past:end] = k
            vc[:, :, past:end] = v
            k, v = kc[:, :, :end], vc[:, :, :end]
            if T == 1 or past == 0:   # one new query sees every key; a prefill is plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1)
            else:                     # causal aligned bottom-right, as tinylora's
                keep = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x, cache=None, past: int = 0):
        x = x + self.attn(self.ln_1(x), cache, past)
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets=None, cache=None, past: int = 0):
        """cache: one (k, v) pair per block from ``make_cache``; idx continues after
        ``past`` cached positions."""
        B, T = idx.shape
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], past)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def make_cache(self, batch: int, capacity: int):
        """Per block, empty key and value buffers (batch, nh, capacity, hs)."""
        block = self.transformer.h[0].attn
        nh, C = block.n_head, self.transformer.wte.embedding_dim
        shape = (batch, nh, capacity, C // nh)
        return [(torch.empty(shape), torch.empty(shape)) for _ in self.transformer.h]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int):
        """Greedy decoding with the KV cache: the prompt idx (B, T) once, then one token per
        step; the prompt and new tokens must fit in block_size (no sliding window here)."""
        B, T = idx.shape
        if T + max_new_tokens > self.transformer.wpe.num_embeddings:
            raise ValueError("TorchGPT.generate: prompt + new tokens exceed block_size")
        cache = self.make_cache(B, T + max_new_tokens)
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long)
        out[:, :T] = idx
        feed, past = idx, 0
        for i in range(max_new_tokens):
            logits, _ = self(feed, cache=cache, past=past)
            past += feed.shape[1]
            out[:, T + i] = logits[:, -1].argmax(-1)
            feed = out[:, T + i:T + i + 1]
        return out


def add_lora(model: TorchGPT, r: int = 8, alpha: float = 16.0) -> TorchGPT:
    """Freeze everything, then wrap the attention and MLP linears with LoRA."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        block.attn.c_attn = LoRALinear(block.attn.c_attn, r, alpha)
        block.attn.c_proj = LoRALinear(block.attn.c_proj, r, alpha)
        block.mlp.c_fc = LoRALinear(block.mlp.c_fc, r, alpha)
        block.mlp.c_proj = LoRALinear(block.mlp.c_proj, r, alpha)
    return model


def make_step(model: TorchGPT, lr: float = 1e-3):
    """One training step (forward, backward, AdamW) as a closure over a fixed batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step
