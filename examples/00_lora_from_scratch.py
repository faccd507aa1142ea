"""LoRA and QLoRA from scratch, in one file: NumPy and the Python standard library only.

Read it top to bottom, one `# %%` cell per step (it opens as a notebook in Jupyter or VS Code).
tests/test_one_file.py checks that it computes, number for number, what the tinylora package
computes (loss, every gradient, AdamW steps, NF4 bytes, the adapter file).

    python examples/00_lora_from_scratch.py [--quick] [--text file_to_fine_tune_on.py]
"""
import argparse, copy, inspect, json, math, os, statistics, struct, time  # noqa: E401
from dataclasses import dataclass

import numpy as np

MAIN = __name__ == "__main__"     # imported (as the test does), the file only defines things
if MAIN:
    p = argparse.ArgumentParser(description="LoRA and QLoRA from scratch in NumPy.")
    p.add_argument("--quick", action="store_true", help="tiny settings: runs in seconds")
    p.add_argument("--text", help="a text file to fine-tune on (default: the source of argparse)")
    p.add_argument("--out", default="lora_from_scratch_out", help="folder for the written files")
    ARGS, T0 = p.parse_known_args()[0], time.time()   # known: Jupyter passes its own arguments

# %% 1. Tensor and autograd
# A Tensor holds an array (.data), its gradient (.grad) and how it was made: its parents and a
# function from the output's gradient to one gradient per parent. backward() visits nodes in
# reverse topological order, so each gradient is complete (all uses added) before it passes on.
class Tensor:
    def __init__(self, data, parents=(), backward=None, requires_grad=False):
        self.data, self.grad = np.asarray(data), None
        self.requires_grad = requires_grad or any(p.requires_grad for p in parents)
        self.parents = tuple(parents) if self.requires_grad else ()   # a graph only where
        self._backward = backward if self.requires_grad else None     # a gradient will flow

    shape = property(lambda self: self.data.shape)
    T = property(lambda self: self.transpose())

    def _lift(self, other):   # numbers and arrays become constants of our dtype
        return other if isinstance(other, Tensor) else Tensor(np.asarray(other, self.data.dtype))

    def __add__(self, other):   # y = a + b  ->  da = dy, db = dy  (backward() unbroadcasts)
        a, b = self, self._lift(other)
        return Tensor(a.data + b.data, (a, b), lambda g: (g, g))

    def __mul__(self, other):   # y = a * b  ->  da = dy * b,  db = dy * a
        a, b = self, self._lift(other)
        return Tensor(a.data * b.data, (a, b), lambda g: (g * b.data if a.requires_grad else None,
                                                          g * a.data if b.requires_grad else None))

    def __pow__(self, k):       # y = aᵏ (k a number)  ->  da = dy * k·aᵏ⁻¹
        return Tensor(self.data ** k, (self,), lambda g: (g * k * self.data ** (k - 1),))

    def __matmul__(self, other):   # y = a @ b (batched)  ->  da = dy @ bᵀ,  db = aᵀ @ dy
        a, b = self, self._lift(other)
        def backward(g):           # a frozen input gets None, not even computed: no dW in LoRA
            return (g @ b.data.swapaxes(-1, -2) if a.requires_grad else None,
                    a.data.swapaxes(-1, -2) @ g if b.requires_grad else None)
        return Tensor(a.data @ b.data, (a, b), backward)

    def exp(self):              # y = eᵃ  ->  da = dy * y
        y = np.exp(self.data)
        return Tensor(y, (self,), lambda g: (g * y,))

    def log(self):              # y = log a  ->  da = dy / a
        return Tensor(np.log(self.data), (self,), lambda g: (g / self.data,))

    def tanh(self):             # y = tanh a  ->  da = dy * (1 - y²)
        y = np.tanh(self.data)
        return Tensor(y, (self,), lambda g: (g * (1 - y * y),))

    def sum(self, axis=None, keepdims=False):   # y = Σ a  ->  da = dy copied along the axes
        y = self.data.sum(axis=axis, keepdims=True)   # the summed axes kept (as 1s) for backward
        return Tensor(y if keepdims else np.squeeze(y, axis), (self,),
                      lambda g: (np.broadcast_to(g.reshape(y.shape), self.shape),))

    def reshape(self, *shape):  # y = a in a new shape  ->  da = dy in a's shape
        return Tensor(self.data.reshape(*shape), (self,), lambda g: (g.reshape(self.shape),))

    def transpose(self, *axes):  # y = a, axes permuted  ->  da = dy, the inverse permutation
        axes = axes or tuple(reversed(range(self.data.ndim)))
        return Tensor(self.data.transpose(axes), (self,), lambda g: (g.transpose(np.argsort(axes)),))

    def __getitem__(self, idx):  # y = a[idx]  ->  da = zeros, with dy added at idx
        def backward(g):         # np.add.at: a repeated index (a token seen twice) must add up
            da = np.zeros_like(self.data)
            np.add.at(da, idx, g)
            return (da,)
        return Tensor(self.data[idx], (self,), backward)

    # the rest is built from the ops above, so it needs no backward of its own
    def __neg__(self): return self * -1.0
    def __sub__(self, other): return self + (-self._lift(other))
    def __truediv__(self, other): return self * self._lift(other) ** -1.0
    __radd__, __rmul__ = __add__, __mul__

    def mean(self, axis=None, keepdims=False):   # Σ a / (the number of entries summed)
        s = self.sum(axis=axis, keepdims=keepdims)
        return s * (s.data.size / self.data.size)

    def backward(self):
        order, seen, stack = [], set(), [(self, False)]
        while stack:                        # depth-first post-order, without recursion
            t, expanded = stack.pop()
            if expanded:
                order.append(t)             # appended after every node it depends on
            elif id(t) not in seen:
                seen.add(id(t))
                stack += [(t, True)] + [(p, False) for p in t.parents]
        self.grad = np.ones_like(self.data)
        for t in reversed(order):           # the loss first; each node after all its users
            for p, g in zip(t.parents, t._backward(t.grad) if t.parents else ()):
                if g is not None and p.requires_grad:
                    g = unbroadcast(g, p.shape)
                    p.grad = g if p.grad is None else p.grad + g

def unbroadcast(g, shape):
    """Sum g back to `shape`: a broadcast input is used once per copy; its gradient sums them."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g  # new axes
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)    # stretched 1s
    return g.sum(axis=ones, keepdims=True) if ones else g

# Composite functions: a few ops each, differentiated by the chain rule for free.
def log_softmax(x, axis=-1):   # x - log Σ eˣ; subtracting the row max c first keeps exp finite
    z = x - x.data.max(axis=axis, keepdims=True)
    return z - z.exp().sum(axis=axis, keepdims=True).log()

def cross_entropy(logits, targets):
    """Mean over rows of -log softmax(logits)[target]; logits (N, V), targets (N,) ints."""
    return -log_softmax(logits)[np.arange(len(targets)), targets].mean()

def layer_norm(x, w, b, eps=1e-5):
    """(x - mean) / √(var + eps) · w + b over the last axis (biased variance, as PyTorch)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    return xc * ((xc * xc).mean(axis=-1, keepdims=True) + eps) ** -0.5 * w + b

def gelu(x):
    """x·Φ(x) in GPT-2's tanh form: x/2 · (1 + tanh(√(2/π)(x + 0.044715 x³)))."""
    return 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())

# %% 2. Gradient check
# Each backward above is a hand-derived formula; central differences check it with none:
# df/dx ≈ (f(x + h) - f(x - h)) / 2h, error O(h²); in float64, h = 1e-6 leaves ~10 digits.
# Each op's output is reduced to a scalar by random weights, so every entry's gradient counts.
def gradcheck(f, inputs, h=1e-6, probes=6, seed=0, floor=1e-3):
    """Worst |numerical - backward's| / max(|numerical| + |backward's|, floor) over `probes`
    entries of each input of scalar f; below the floor, f's rounding blurs the differences."""
    rng, worst = np.random.default_rng(seed), 0.0
    for t in inputs:
        t.grad = None
    f(*inputs).backward()
    for t in inputs:
        flat = t.data.reshape(-1)           # a view: nudging flat[i] nudges t
        for i in rng.choice(flat.size, min(probes, flat.size), replace=False):
            old, fx = flat[i], []
            for x in (old + h, old - h):
                flat[i] = x
                fx.append(float(f(*inputs).data))
            flat[i] = old
            num, ana = (fx[0] - fx[1]) / (2 * h), t.grad.reshape(-1)[i]
            worst = max(worst, abs(num - ana) / max(abs(num) + abs(ana), floor))
    return worst

if MAIN:   # every op above, on random float64 inputs
    rng = np.random.default_rng(0)
    cases = [  # name, function, input shapes, inputs positive (for log and powers)
        ("a + b (broadcast)", lambda a, b: a + b, [(3, 4), (4,)], False),
        ("a * b (broadcast)", lambda a, b: a * b, [(3, 4), (3, 1)], False),
        ("a ** k", lambda a: a ** 3 + a ** -0.5, [(3, 4)], True),
        ("a @ b (batched)", lambda a, b: a @ b, [(2, 3, 4), (4, 5)], False),
        ("exp", lambda a: a.exp(), [(3, 4)], False),
        ("log", lambda a: a.log(), [(3, 4)], True),
        ("tanh", lambda a: a.tanh(), [(3, 4)], False),
        ("sum(axis)", lambda a: a.sum(axis=1), [(3, 4, 5)], False),
        ("reshape", lambda a: a.reshape(4, 3), [(3, 4)], False),
        ("transpose", lambda a: a.transpose(1, 0, 2), [(2, 3, 4)], False),
        ("getitem (repeats)", lambda a: a[np.array([0, 2, 0])], [(3, 4)], False),
        ("mean, a - b, a / b", lambda a, b: (a - b).mean(axis=0) / b, [(3, 4), (4,)], True),
        ("softmax", lambda a: log_softmax(a).exp(), [(3, 5)], False),
        ("cross_entropy", lambda a: cross_entropy(a, np.array([1, 0, 4])), [(3, 5)], False),
        ("layer_norm", layer_norm, [(3, 6), (6,), (6,)], False),
        ("gelu", gelu, [(3, 4)], False),
    ]
    print(f"{'op':<20} {'max relative error':>20}")
    for name, fn, shapes, positive in cases:
        xs = [Tensor(rng.uniform(0.5, 1.5, s) if positive else rng.normal(size=s),
                     requires_grad=True) for s in shapes]
        w = rng.normal(size=np.shape(fn(*xs).data))        # f = Σ w ⊙ op(x): a scalar
        err = gradcheck(lambda *a: (fn(*a) * w).sum(), xs)
        print(f"{name:<20} {err:>20.2e}  {'ok' if err < 1e-6 else 'FAILED'}")
        assert err < 1e-6, name

# %% 3. A tiny GPT
# GPT-2 at toy size, with its parameter names and PyTorch's layouts (Linear weight (out, in)),
# so weights move to and from tinylora.models.GPT by name. Pre-norm blocks: x + attn(ln_1(x)),
# then x + mlp(ln_2(x)). The head is the token embedding (tied): both uses add into its grad.
@dataclass
class GPTConfig:
    vocab_size: int = 96
    block_size: int = 64      # the longest context (rows of wpe)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64

class Module:
    def params(self):         # its tensors by name, as in a PyTorch state_dict
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}

class Linear(Module):         # y = x Wᵀ + b, W (out, in)
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x):
        return x @ self.weight.T + self.bias

class LayerNorm(Module):
    def __init__(self, n, dtype):
        self.weight = Tensor(np.ones(n, dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(n, dtype), requires_grad=True)

    def __call__(self, x):
        return layer_norm(x, self.weight, self.bias)

class Embedding(Module):      # one row per id: a gather (getitem)
    def __init__(self, weight): self.weight = weight
    def __call__(self, ids): return self.weight[ids]

class GPT:
    """idx (B, T) int ids -> logits (B, T, V), and the mean cross-entropy given targets."""

    def __init__(self, cfg, seed=0, dtype=np.float32):
        rng, C, L, self.cfg = np.random.default_rng(seed), cfg.n_embd, cfg.n_layer, cfg
        def normal(*shape, std=0.02):       # GPT-2's init: N(0, 0.02), zero biases
            return Tensor(rng.normal(0.0, std, shape).astype(dtype), requires_grad=True)
        def linear(n_out, n_in, std=0.02):
            return Linear(normal(n_out, n_in, std=std),
                          Tensor(np.zeros(n_out, dtype), requires_grad=True))
        proj = 0.02 / math.sqrt(2 * L)      # residual projections (2 a block): flat variance
        m = {"transformer.wte": Embedding(normal(cfg.vocab_size, C)),
             "transformer.wpe": Embedding(normal(cfg.block_size, C))}
        for h in (f"transformer.h.{i}" for i in range(L)):
            m[f"{h}.ln_1"], m[f"{h}.ln_2"] = LayerNorm(C, dtype), LayerNorm(C, dtype)
            m[f"{h}.attn.c_attn"] = linear(3 * C, C)       # q, k and v in one product
            m[f"{h}.attn.c_proj"] = linear(C, C, proj)
            m[f"{h}.mlp.c_fc"] = linear(4 * C, C)
            m[f"{h}.mlp.c_proj"] = linear(C, 4 * C, proj)
        m["transformer.ln_f"] = LayerNorm(C, dtype)
        self.modules = m                    # module path -> layer; LoRA swaps entries

    def named_parameters(self):
        return {f"{path}.{k}": t for path, mod in self.modules.items()
                for k, t in mod.params().items()}

    def parameters(self):                   # the trainable ones
        return [t for t in self.named_parameters().values() if t.requires_grad]

    def load_state_dict(self, arrays):
        for k, t in self.named_parameters().items():   # a missing name is a KeyError
            t.data = np.array(arrays[k], dtype=t.data.dtype).reshape(t.shape)

    def attention(self, h, x):
        B, T, C = x.shape
        nh, hs = self.cfg.n_head, C // self.cfg.n_head
        qkv = self.modules[f"{h}.attn.c_attn"](x)                       # (B, T, 3C)
        q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
                   for i in range(3))                                   # (B, nh, T, hs)
        att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))     # (B, nh, T, T)
        future = np.triu(np.full((T, T), -np.inf), 1)                   # key j > query i
        att = log_softmax(att + future).exp()                           # softmax; e^-inf = 0
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)            # heads side by side
        return self.modules[f"{h}.attn.c_proj"](y)

    def __call__(self, idx, targets=None):
        m, (B, T) = self.modules, idx.shape
        x = m["transformer.wte"](idx) + m["transformer.wpe"](np.arange(T))   # (B, T, C)
        for h in (f"transformer.h.{i}" for i in range(self.cfg.n_layer)):
            x = x + self.attention(h, m[f"{h}.ln_1"](x))
            x = x + m[f"{h}.mlp.c_proj"](gelu(m[f"{h}.mlp.c_fc"](m[f"{h}.ln_2"](x))))
        logits = m["transformer.ln_f"](x) @ m["transformer.wte"].weight.T   # (B, T, V): tied
        if targets is None:
            return logits, None
        return logits, cross_entropy(logits.reshape(B * T, -1), np.reshape(targets, -1))

if MAIN:   # the whole model against finite differences, at toy size in float64
    tiny = GPT(GPTConfig(vocab_size=11, block_size=5, n_layer=1, n_head=2, n_embd=8), 0, np.float64)
    ids = np.random.default_rng(1).integers(0, 11, (2, 5))
    err = gradcheck(lambda *p: tiny(ids[:, :-1], ids[:, 1:])[1], tiny.parameters())
    print(f"the whole GPT, every parameter: max relative error {err:.2e}")
    assert err < 1e-6

# %% 4. Training with AdamW
# Characters are tokens: printable ASCII plus newline, 96 ids. The base model learns English
# from the standard library's docstrings; fine-tuning then teaches it Python source code.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
STOI = {c: i for i, c in enumerate(VOCAB)}

def encode(text):
    return np.array([STOI.get(c, STOI["?"]) for c in text.replace("\t", "    ")], np.int64)

def load_texts(path=None):
    """(prose, code): docstrings to pretrain on; Python source (argparse's, or path) to tune on."""
    mods = [__import__(m) for m in "collections enum fractions functools heapq logging pathlib "
            "random re shutil string textwrap".split()]
    docs = [inspect.getdoc(obj) for m in mods for name, obj in sorted(vars(m).items())
            if not name.startswith("_") and getattr(obj, "__module__", None) == m.__name__]
    path = path or inspect.getsourcefile(argparse)
    if path is None or not os.path.isfile(path):
        raise SystemExit(f"--text {path}: no such file; give the path of a text file to train on")
    with open(path, encoding="utf-8", errors="replace") as f:
        return "\n\n".join(d for d in docs if d), f.read()

def get_batch(data, batch_size, block_size, rng):
    """Random windows of the text: inputs x (B, T) and their next characters y (B, T)."""
    starts = rng.integers(0, len(data) - block_size - 1, batch_size)
    w = np.stack([data[i:i + block_size + 1] for i in starts])
    return w[:, :-1], w[:, 1:]

class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch and tinylora.optim:
        p ← p·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
        p ← p − lr · m̂ / (√v̂ + ε),   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ): unbiased, though m, v start at 0"""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.t = lr, betas, eps, weight_decay, 0
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.t += 1
        lr, b1, b2, t = self.lr, self.b1, self.b2, self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if self.wd and p.data.ndim >= 2:     # matrices only, not biases or gains (GPT-2)
                p.data *= 1.0 - lr * self.wd
            m[:] = b1 * m + (1 - b1) * p.grad
            v[:] = b2 * v + (1 - b2) * (p.grad * p.grad)
            denom = np.sqrt(v) * (1.0 / math.sqrt(1 - b2 ** t)) + self.eps   # √v̂ + ε
            p.data -= (lr / (1 - b1 ** t)) * (m / denom)

def train(model, data, steps, lr, batch_size, seed=0, weight_decay=0.0, log=0):
    """`steps` AdamW steps on random batches; the last step's gradients stay in .grad."""
    opt, rng = AdamW(model.parameters(), lr, weight_decay=weight_decay), np.random.default_rng(seed)
    for step in range(steps):
        _, loss = model(*get_batch(data, batch_size, model.cfg.block_size, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step % log == 0 or step == steps - 1):
            print(f"  step {step:4d}  loss {float(loss.data):.3f}")
    return model

def evaluate(model, data, batch_size, batches=4):   # mean loss; every model, the same batches
    rng = np.random.default_rng(1234)
    return float(np.mean([model(*get_batch(data, batch_size, model.cfg.block_size, rng))[1].data
                          for _ in range(batches)]))

if MAIN:
    S = (dict(n_head=2, n_embd=32, batch=8, pretrain=120, tune=40) if ARGS.quick else
         dict(n_head=4, n_embd=64, batch=16, pretrain=600, tune=200))
    prose, code = load_texts(ARGS.text)
    tune_data, val_data = np.split(encode(code), [int(0.9 * len(code))])   # 10% held out
    cfg = GPTConfig(len(VOCAB), block_size=32, n_layer=2, n_head=S["n_head"], n_embd=S["n_embd"])
    print(f"pretraining on {len(prose):,} characters of docstrings")
    base = train(GPT(cfg, seed=0), encode(prose), S["pretrain"], 2e-3, S["batch"], seed=0,
                 weight_decay=0.01, log=S["pretrain"] // 4)
    val_base = evaluate(base, val_data, S["batch"])
    print(f"the base model's loss on held-out Python: {val_base:.3f}\nfull fine-tuning on Python")
    def finetune(model, lr):   # the same steps and batches for full, LoRA and QLoRA
        return train(model, tune_data, S["tune"], lr, S["batch"], seed=1, log=S["tune"] // 2)
    full = finetune(copy.deepcopy(base), 1e-3)    # a copy: every weight trainable

# %% 5. LoRA
# Freeze the pretrained W (d × k) and learn its update as ΔW = B·A, B (d × r), A (r × k):
#   y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,  s = α/r:  r·(d + k) numbers to train instead of d·k.
# With u = x Aᵀ: dB = s · dyᵀ u, dA = s · (dy B)ᵀ x, dx = dy W + s · (dy B) A. W is frozen, so
# dW = dyᵀ x is never computed, and neither is the d × k product B·A (until a merge).
class LoRALinear(Module):
    """A frozen base layer plus a trainable low-rank update; A Kaiming-uniform, B zero."""

    def __init__(self, base, r, alpha, rng, init="lora"):
        self.base, self.scale = base, alpha / r
        for t in base.params().values():
            t.requires_grad = False
        bound = 1 / math.sqrt(base.in_features)                 # PyTorch Linear's init (a=√5)
        A = rng.uniform(-bound, bound, (r, base.in_features))
        B = np.zeros((base.out_features, r))      # B = 0: the model starts exactly as the base
        if init == "zeros":                       # the two other inits, for the experiment below
            A = np.zeros_like(A)
        elif init == "random":
            B = rng.uniform(-1 / math.sqrt(r), 1 / math.sqrt(r), B.shape)
        self.lora_A = Tensor(A.astype(base.weight.data.dtype), requires_grad=True)
        self.lora_B = Tensor(B.astype(base.weight.data.dtype), requires_grad=True)

    def __call__(self, x):
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    def params(self):   # the base's names stay, the adapter's are PEFT's
        return {**self.base.params(), "lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def merge(self):
        """A plain Linear with W + (α/r)·B·A: after merging, inference costs nothing extra."""
        W = self.base.weight.data + self.scale * (self.lora_B.data @ self.lora_A.data)
        return Linear(Tensor(W), self.base.bias)

TARGETS = ("c_attn", "c_proj", "c_fc")      # attention and MLP linears, by PEFT's rule

def add_lora(model, r=8, alpha=16, seed=0, init="lora"):
    """Freeze every parameter of model, then wrap each targeted Linear in a LoRALinear."""
    rng = np.random.default_rng(seed)
    for t in model.parameters():
        t.requires_grad, t.grad = False, None
    for path in [p for p in model.modules if p.rsplit(".", 1)[-1] in TARGETS]:
        model.modules[path] = LoRALinear(model.modules[path], r, alpha, rng, init)
    return model

def merged(model):   # a copy of model with every adapter merged into its base weight
    out = copy.copy(model)
    out.modules = {p: m.merge() if isinstance(m, LoRALinear) else m for p, m in model.modules.items()}
    return out

def count(model):    # (trainable, all) parameters; a 4-bit W counts as its float values
    n_all = sum(t.data.size for t in model.named_parameters().values())
    bases = [getattr(m, "base", m) for m in model.modules.values()]
    n_all += sum(m.out_features * m.in_features for m in bases if hasattr(m, "packed"))
    return sum(t.data.size for t in model.parameters()), n_all

def why_b_starts_at_zero(base, data, batch_size):   # |dA|, |dB| at steps 0 and 1, per init
    for init, name in [("lora", "A random, B = 0 (LoRA)"), ("zeros", "A = B = 0"),
                       ("random", "A, B random")]:
        model, norms = add_lora(copy.deepcopy(base), init=init), []
        change = evaluate(model, data, batch_size) - evaluate(base, data, batch_size)
        for step in range(2):   # the trainable tensors alternate A, B, A, B, ...
            params = train(model, data, 1, 1e-2, batch_size, seed=step).parameters()
            norms += [math.sqrt(sum(float((p.grad ** 2).sum()) for p in params[i::2])) for i in (0, 1)]
        print(f"{name:<24}" + "".join(f"{v:>12.2e}" for v in norms) + f"{change:>+23.4f}")

if MAIN:
    print("\nWhy does B start at zero, and how can it learn? |grad| summed over all adapters:\n"
          f"{'init':<24}{'|dA| step 0':>12}{'|dB| step 0':>12}{'|dA| step 1':>12}"
          f"{'|dB| step 1':>12}{'loss - base at step 0':>23}")
    why_b_starts_at_zero(base, tune_data, S["batch"])
    print("-> B = 0: dA = s·(dy B)ᵀ x = 0 but dB = s·dyᵀ (x Aᵀ) != 0, so B moves first, then A.\n"
          "   Both zero: both gradients stay zero forever. Both random: the model changed at once.")
    lora_model = add_lora(copy.deepcopy(base), r=8, alpha=16)
    n_train, n_all = count(lora_model)
    print(f"\nLoRA r=8, alpha=16 on {', '.join(TARGETS)}: trainable {n_train:,} of {n_all:,} "
          f"({100 * n_train / n_all:.2f}%)")
    finetune(lora_model, 8e-3)
    frozen = [t for t in lora_model.named_parameters().values() if not t.requires_grad]
    assert all(t.grad is None for t in frozen)
    print(f"no dW: after {S['tune']} steps, no frozen tensor (of {len(frozen)}) has a gradient")
    xb, _ = get_batch(val_data, 2, cfg.block_size, np.random.default_rng(0))
    gap = np.abs(lora_model(xb)[0].data - merged(lora_model)(xb)[0].data).max()
    print(f"merged W + (α/r)·B·A vs the adapter kept apart: max |logits difference| {gap:.1e}")
    assert gap < 1e-4

# %% 6. QLoRA
# Store the frozen W in 4 bits. Weights are roughly normal; divided by its block's absmax, a
# block of 64 lies in [-1, 1]. NF4's 16 levels are quantiles of the normal distribution (each
# level equally likely: best for normal data), with an exact 0, scaled to [-1, 1].
def linspace32(a, b, num):
    """float32 points, each rounded once from the nearer end (torch.linspace, which made
    bitsandbytes' map)."""
    a, b = np.float32(a), np.float32(b)
    step, i = np.float64((b - a) / np.float32(num - 1)), np.arange(num, dtype=np.float64)
    return np.where(i < num // 2, a + step * i, b - step * (num - 1 - i)).astype(np.float32)

def nf4_levels(top=0.9677083):
    """Normal quantiles Q(p) for 8 p in even float32 steps from `top` to 0.5 (left out), minus
    those for 7 such p, and 0, over the largest: as bitsandbytes made them. Q(1) = ∞, so top is
    1 - (1/32 + 1/30)/2 to 7 digits: between the middles of the last of 16 and of 15 equal bins."""
    Q = statistics.NormalDist().inv_cdf
    v = np.array([Q(float(p)) for p in linspace32(top, 0.5, 9)[:-1]] + [0.0] +
                 [-Q(float(p)) for p in linspace32(top, 0.5, 8)[:-1]], np.float32)
    return np.sort(v) / v.max()

NF4 = nf4_levels()

def dynamic_map():
    """bitsandbytes' signed 8-bit "dynamic" map, for the double quantization: for exponent
    e = 0..6, 2ᵉ evenly spread fractions in [0.1, 1] times 10^(e-6), both signs, plus 0 and
    1: 256 sorted levels, fine near ±1 and coarse near 0."""
    levels = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        edges = linspace32(0.1, 1.0, 2 ** e + 1)
        mid = (edges[:-1] + edges[1:]) / np.float32(2) * np.float32(10.0 ** (e - 6))
        levels += list(mid) + list(-mid)
    return np.sort(np.array(levels, np.float32))

DYNAMIC = dynamic_map()

def quantize_blocks(x, levels, blocksize, grid=False):
    """float32 x (n,) -> (codes uint8 (n, padded to whole blocks), absmax float32 per block):
    the nearest level (the number of float32 midpoints strictly below; a tie goes down) to x
    times its block's float32 1/absmax (x / absmax in a partial last block, as bitsandbytes'
    CPU path). grid=True, its 8-bit rule: first snap to the nearest point -1 + 2i/65535 (its
    lookup table); an all-zero block gets code 0."""
    blocks = np.concatenate([x, np.zeros(-x.size % blocksize, np.float32)]).reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None]
    if grid:
        i = np.trunc((np.clip(scaled, -1, 1) + 1) * 0.5 * 65535 + 0.5)     # float32 throughout
        scaled = np.where(absmax[:, None] == 0, -1, -1 + 2 * i / 65535)
    elif x.size % blocksize:
        absmax[-1] = max(absmax[-1], np.float32(1e-38))
        scaled[-1] = blocks[-1] / absmax[-1]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2)
    return np.searchsorted(midpoints, scaled.reshape(-1), side="left").astype(np.uint8), absmax

def torch_sum32(x):
    """float32 sum in PyTorch's CPU order (bitsandbytes' offset is its absmax.mean(); float + is
    not associative): rows of 4 accumulators x 8 lanes (1 below 8 values) summed in runs of
    `step`, the runs in groups, the groups in supergroups; then the leftovers, one by one."""
    lanes, n_vec = (8, x.size // 8) if x.size >= 8 else (1, x.size)
    rows, step = n_vec // 4, 1 << max(4, (n_vec // 4 - 1).bit_length() // 4)
    tree = np.zeros((max(1, -(-rows // step ** 3)) * step ** 3, 4, lanes), np.float32)
    tree[:rows] = x[:rows * 4 * lanes].reshape(rows, 4, lanes)   # zero padding adds exactly
    for _ in range(3):                                            # cumsum adds one at a time
        tree = np.cumsum(tree.reshape(-1, step, 4, lanes), axis=1)[:, -1]
    acc = np.cumsum(tree, axis=0)[-1]
    left = x[rows * 4 * lanes:n_vec * lanes].reshape(-1, lanes)         # vectors left over
    acc[0] = np.cumsum(np.concatenate([acc[:1], left]), axis=0)[-1]
    return np.cumsum(np.concatenate([x[n_vec * lanes:], ((acc[0] + acc[1]) + acc[2]) + acc[3]]))[-1]

def nf4_quantize(w, blocksize=64):
    """NF4 with double quantization, byte for byte the format of bitsandbytes (and tinylora).
    Returns the packed bytes (two codes a byte, the first in the high nibble) and the state."""
    codes, absmax = quantize_blocks(np.asarray(w, np.float32).reshape(-1), NF4, blocksize)
    packed = ((codes[0::2] << 4) | codes[1::2])[:(w.size + 1) // 2]
    # double quantization: the float32 absmax values (one per 64 weights) minus their mean (so the
    # map's resolution goes to their spread) become 8-bit codes in blocks of 256: 32/64 bits per
    # weight fall to 8/64 + 32/(64·256)
    offset = torch_sum32(absmax) / np.float32(absmax.size)
    codes8, nested_absmax = quantize_blocks(absmax - offset, DYNAMIC, 256, grid=True)
    return packed, dict(absmax=codes8[:absmax.size], nested_absmax=nested_absmax,
                        offset=float(offset), quant_map=NF4, nested_quant_map=DYNAMIC,
                        blocksize=blocksize, shape=w.shape)

def nf4_dequantize(packed, st):
    """level[code] · absmax, where absmax = dynamic[code8] · nested_absmax + offset; float32."""
    scales = DYNAMIC[st["absmax"]] * np.repeat(st["nested_absmax"], 256)[:st["absmax"].size]
    scales = scales + np.float32(st["offset"])
    codes, n = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1), math.prod(st["shape"])
    return (NF4[codes[:n]] * np.repeat(scales, st["blocksize"])[:n]).reshape(st["shape"])

class Linear4bit(Linear):
    """A frozen Linear whose W lives as NF4 bytes, dequantized at each forward (QLoRA)."""

    def __init__(self, linear):
        self.dtype, self.bias = linear.weight.data.dtype, linear.bias
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.packed, self.state = nf4_quantize(linear.weight.data)

    @property
    def weight(self):   # a constant: no gradient ever flows into it
        return Tensor(nf4_dequantize(self.packed, self.state).astype(self.dtype))

    def nbytes(self):   # codes, 8-bit scales, their float32 scales, the offset
        return self.packed.nbytes + self.state["absmax"].nbytes + self.state["nested_absmax"].nbytes + 4

if MAIN:
    qlora_model = copy.deepcopy(base)          # the same base, its targeted W now in 4 bits
    q4 = {p: Linear4bit(m) for p, m in qlora_model.modules.items() if p.rsplit(".", 1)[-1] in TARGETS}
    qlora_model.modules.update(q4)
    n_w = sum(m.out_features * m.in_features for m in q4.values())
    q_bytes = sum(m.nbytes() for m in q4.values())
    print(f"\nNF4 levels: {np.round(NF4, 4)}\n4-bit base: {q_bytes:,} bytes for {n_w:,} weights, "
          f"{8 * q_bytes / n_w:.3f} bits ({q_bytes / n_w:.4f} bytes) per parameter, against 4 "
          "bytes in float32\nQLoRA fine-tuning (LoRA on the 4-bit base)")
    finetune(add_lora(qlora_model, r=8, alpha=16), 8e-3)

# %% 7. The adapter file
# PEFT's layout: adapter_config.json (the settings) and adapter_model.safetensors (A and B).
# safetensors is simple enough to write by hand: a little-endian u64 giving the header's length,
# the header (JSON: each tensor's dtype, shape and byte range), then the raw little-endian data.
def save_safetensors(path, tensors):
    arrays = {k: np.ascontiguousarray(v, "<f4") for k, v in sorted(tensors.items())}
    header, offset = {}, 0
    for k, a in arrays.items():
        header[k] = dict(dtype="F32", shape=list(a.shape), data_offsets=[offset, offset + a.nbytes])
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt"}   # str -> str; "pt": torch's loaders accept it
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)           # pad with spaces: the data starts 8-byte aligned
    with open(f"{path}.tmp", "wb") as f:    # write beside, then rename: never half a file
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(a.tobytes() for a in arrays.values()))
    os.replace(f"{path}.tmp", path)
    return os.path.getsize(path)

def save_adapter(model, folder, r=8, alpha=16):
    """Tensor names are base_model.model.<module path>.lora_A.weight (and lora_B), as PEFT's."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                   "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
                   "fan_in_fan_out": False}, f, indent=2)   # True: W stored (in, out), as Conv1D
    tensors = {f"base_model.model.{path}.{k}": t.data for path, m in model.modules.items()
               if isinstance(m, LoRALinear) for k, t in m.params().items() if "lora_" in k}
    return save_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)

if MAIN:
    lora_size = save_adapter(lora_model, os.path.join(ARGS.out, "lora_adapter"))
    qlora_size = save_adapter(qlora_model, os.path.join(ARGS.out, "qlora_adapter"))
    full_size = save_safetensors(os.path.join(ARGS.out, "full_model.safetensors"),
                                 {k: t.data for k, t in full.named_parameters().items()})
    with open(os.path.join(ARGS.out, "lora_adapter", "adapter_model.safetensors"), "rb") as f:
        print(f"\nwrote {ARGS.out}/; the LoRA adapter file begins {f.read(100)}...")

# %% 8. Full vs LoRA vs QLoRA
# The same base, data, steps and batches for each method; validation loss on held-out code.
if MAIN:
    print(f"\n{'method':<18}{'trainable':>11}{'share':>9}{'val loss':>10}{'saved file':>14}"
          f"{'frozen targeted W':>19}\n{'base model':<38}{val_base:>10.3f}")
    for name, model, size, frozen_w in [("full fine-tuning", full, full_size, "-"),
                                        ("LoRA", lora_model, lora_size, f"{4 * n_w:,} B"),
                                        ("QLoRA", qlora_model, qlora_size, f"{q_bytes:,} B")]:
        n_train, n_all = count(model)
        print(f"{name:<18}{n_train:>11,}{100 * n_train / n_all:>8.2f}%"
              f"{evaluate(model, val_data, S['batch']):>10.3f}{size:>12,} B{frozen_w:>19}")
    print(f"\ndone in {time.time() - T0:.1f} s")
