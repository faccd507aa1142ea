"""BERT, the encoder behind sentence-transformers' all-MiniLM-L6-v2, in one readable file.

Module paths mirror Hugging Face's ``BertModel`` exactly (``encoder.layer.0.attention.self.query``,
``encoder.layer.0.output.LayerNorm``, ...), so a checkpoint loads by name, and a LoRA adapter
saved here (``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``) loads in
PEFT onto the Hugging Face model, and the other way round.

    x = word_emb[ids] + pos_emb[0..T) + type_emb[token_type_ids];  x = LayerNorm(x)
    per layer (post-norm, the original BERT order):
        x = LayerNorm(x + dense(attention(x, padding mask)))
        x = LayerNorm(x + dense(gelu(dense(x))))
    -> last_hidden_state (B, T, H)
"""
from __future__ import annotations

import contextvars
import dataclasses
import pathlib
from dataclasses import dataclass

from .. import backend
from .. import functional as F
from .. import nn
from ..backend import np, xp
from ..configs import config_from_dict
from ..io import FormatError, load_json, load_safetensors, read_safetensors_header
from ..ops import cat
from ..tensor import Tensor

__all__ = ["BertConfig", "BertModel", "BertLoadError"]


class BertLoadError(FormatError):
    """A BERT folder this loader cannot use: wrong architecture, missing or mis-shaped tensors."""


# hidden_act values of HF configs -> our activation. "gelu" is exact (erf) in HF; the tanh
# approximation has three names there.
_ACTIVATIONS = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
                "gelu_fast": "tanh", "relu": "relu"}


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that define the computation."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BertConfig: {name} must be a positive integer, got {v!r:.40}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig: hidden_act {self.hidden_act!r} is not implemented; "
                             f"use one of {', '.join(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "BertConfig":
        """From a parsed HF ``config.json``: extra HF fields are ignored, but ``model_type``
        must be "bert" and settings that change the computation must be ones we implement."""
        if not isinstance(d, dict):
            raise BertLoadError(f"{source}: a BERT config must be a JSON object")
        model_type = d.get("model_type")
        if model_type != "bert":
            raise BertLoadError(f"{source}: model_type is {model_type!r}, but BertModel loads only "
                                "model_type 'bert' checkpoints")
        unsupported = {"position_embedding_type": "absolute", "is_decoder": False,
                       "add_cross_attention": False}
        for key, ok in unsupported.items():
            if d.get(key, ok) != ok:
                raise BertLoadError(f"{source}: {key}={d[key]!r} is not implemented (only {ok!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        return config_from_dict(cls, kwargs, source=source)  # ConfigError on a bad field


# ----------------------------------------------------------------------------- layers

# from_pretrained overwrites every weight, so it builds the model without drawing a random
# init first (that would take three times longer than reading the file).
_skip_init = contextvars.ContextVar("tinylora_bert_skip_init", default=False)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    if not _skip_init.get():
        return nn.Linear(n_in, n_out)
    lin = nn.Linear(0, 0)  # draws nothing; from_pretrained assigns the real arrays
    lin.in_features, lin.out_features = n_in, n_out
    dt = backend.get_default_dtype()
    lin.weight = nn.Parameter(xp.empty((n_out, n_in), dtype=dt))
    lin.bias = nn.Parameter(xp.empty((n_out,), dtype=dt))
    return lin


def _embedding(n: int, dim: int) -> nn.Embedding:
    if not _skip_init.get():
        return nn.Embedding(n, dim)
    emb = nn.Embedding(0, dim)
    emb.num_embeddings = n
    emb.weight = nn.Parameter(xp.empty((n, dim), dtype=backend.get_default_dtype()))
    return emb


def _plain(*modules) -> bool:
    """Plain Linears (no LoRA wrapper): their products may run as one fused op, whose kernel
    (kernels/encode.py) takes a shorter route under no_grad; with grad on it is the same
    composition of ops as calling the modules."""
    return all(type(m) is nn.Linear for m in modules)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = _embedding(config.vocab_size, H)
        self.position_embeddings = _embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = _embedding(config.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None) -> Tensor:
        T = input_ids.shape[1]
        # lookups through the modules (not .weight slices), so LoRA on an embedding applies
        x = self.word_embeddings(input_ids)                          # (B, T, H)
        x = x + self.position_embeddings(xp.arange(T))               # (T, H) broadcast over B
        if token_type_ids is None:  # one segment: every row adds type 0
            token_type_ids = xp.zeros(1, dtype=input_ids.dtype)      # (1, H) broadcast
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.n_head = config.num_attention_heads
        self.query = _linear(H, H)
        self.key = _linear(H, H)
        self.value = _linear(H, H)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, mask) -> Tensor:
        # three Linears (HF's names, separate LoRA targets), packed side by side for the fused
        # op, which splits the heads as strided views and writes them back in (B, T, C) order
        lins = (self.query, self.key, self.value)
        p = self.dropout_p if self.training else 0.0
        if _plain(*lins):
            return F.linear_self_attention(x, [m.weight for m in lins], [m.bias for m in lins],
                                           self.n_head, attn_mask=mask, dropout_p=p)
        qkv = cat([m(x) for m in lins], dim=-1)                         # (B, T, 3C)
        return F.self_attention(qkv, self.n_head, attn_mask=mask, is_causal=False,
                                dropout_p=p)                            # (B, T, C)

    def extra_repr(self):
        return f"n_head={self.n_head}"


class BertOutput(nn.Module):
    """dense, dropout, then the post-norm residual: after attention (``attention.output``,
    in_features = hidden) and after the MLP (``output``, in_features = intermediate)."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dense = _linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        if _plain(self.dense) and type(self.LayerNorm) is nn.LayerNorm and not self.training:
            ln = self.LayerNorm                                      # dropout is off: one op
            return F.linear_add_layer_norm(h, self.dense.weight, self.dense.bias, x,
                                           ln.weight, ln.bias, ln.eps)
        return self.LayerNorm(self.dropout(self.dense(h)) + x)      # post-norm residual


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)  # HF's name; it makes the path "attention.self.query"
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, x: Tensor, mask) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = _linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if self.act == "relu":
            return F.relu(self.dense(x))                             # (B, T, 4H)
        approximate = "none" if self.act == "erf" else "tanh"
        if _plain(self.dense):
            return F.linear_gelu(x, self.dense.weight, self.dense.bias, approximate)
        return F.gelu(self.dense(x), approximate=approximate)

    def extra_repr(self):
        return f"act={self.act}"


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, config.intermediate_size)

    def forward(self, x: Tensor, mask) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x: Tensor, mask) -> Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(hidden state of [CLS])): BERT's next-sentence-prediction head input."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = _linear(config.hidden_size, config.hidden_size)

    def forward(self, last_hidden_state: Tensor) -> Tensor:
        return self.dense(last_hidden_state[:, 0]).tanh()           # (B, H)


# ----------------------------------------------------------------------------- the model

def _as_ids(a, what: str):
    """Ids or masks (list, NumPy, xp array or Tensor) as a (B, T) integer array on the device."""
    a = a.data if isinstance(a, Tensor) else a
    a = xp.asarray(a) if backend.is_array(a) else xp.asarray(np.asarray(a))
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.dtype.kind not in "iub":
        raise ValueError(f"BertModel: {what} must be a (batch, seq_len) integer array, "
                         f"got shape {a.shape} dtype {a.dtype}")
    return a


class BertModel(nn.Module):
    """The BERT encoder. ``forward(input_ids, attention_mask, token_type_ids) -> (B, T, H)``."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                adapter_names=None) -> Tensor:
        """input_ids (B, T) ints; attention_mask (B, T), 1 = real token, 0 = padding;
        token_type_ids (B, T) segment ids (default all 0); adapter_names: one LoRA adapter
        name per row for a mixed batch. Returns last_hidden_state (B, T, H)."""
        ids = _as_ids(input_ids, "input_ids")
        B, T = ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"BertModel: sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}; truncate the input")
        mask = None
        if attention_mask is not None:
            am = _as_ids(attention_mask, "attention_mask")
            if am.shape != ids.shape:
                raise ValueError(f"BertModel: attention_mask {am.shape} must match input_ids {ids.shape}")
            # keys at padded positions get no weight; (B, 1, 1, T) broadcasts over heads, queries
            mask = (am != 0)[:, None, None, :]
        tt = None
        if token_type_ids is not None:
            tt = _as_ids(token_type_ids, "token_type_ids")
            if tt.shape != ids.shape:
                raise ValueError(f"BertModel: token_type_ids {tt.shape} must match input_ids {ids.shape}")
        if adapter_names is None:
            return self.encoder(self.embeddings(ids, tt), mask)
        if len(adapter_names) != B:
            raise ValueError(f"BertModel: adapter_names has {len(adapter_names)} names for a "
                             f"batch of {B} rows; give one per row")
        with nn.adapter_routing(adapter_names):
            return self.encoder(self.embeddings(ids, tt), mask)

    def pooled_output(self, last_hidden_state: Tensor) -> Tensor:
        """HF's ``pooler_output``: (B, H). Needs a checkpoint with a pooler."""
        if self.pooler is None:
            raise ValueError("this BertModel has no pooler (its checkpoint had no pooler.dense); "
                             "use mean pooling of last_hidden_state instead")
        return self.pooler(last_hidden_state)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, directory, dtype=None) -> "BertModel":
        """Load a Hugging Face BERT folder: ``config.json`` + ``model.safetensors`` (or a
        sharded ``model.safetensors.index.json``). Keys may carry a ``bert.`` prefix (as in
        BertFor* checkpoints, whose heads are skipped). dtype: default float32."""
        directory = pathlib.Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {directory} (expected a Hugging Face "
                                    "BERT model folder)")
        raw_config = load_json(config_path)
        config = BertConfig.from_dict(raw_config, source=str(config_path))
        tensors, sources = _read_weights(directory)
        dt = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
        with backend.default_dtype(dt):
            token = _skip_init.set(True)
            try:
                model = cls(config, add_pooling_layer="pooler.dense.weight" in tensors)
            finally:
                _skip_init.reset(token)
        own = model.state_dict()
        missing = [k for k in own if k not in tensors]
        if missing:
            raise BertLoadError(f"{sources}: missing tensor(s) {', '.join(missing[:4])}"
                                f"{' ...' if len(missing) > 4 else ''} (config.json says "
                                f"{config.num_hidden_layers} layers; is this a BERT checkpoint?)")
        stray = [k for k in tensors if k not in own and k.split(".")[0] in ("embeddings", "encoder")]
        if stray:
            raise BertLoadError(f"{sources}: unexpected tensor(s) {', '.join(stray[:4])}; the file "
                                "does not match config.json (more layers, or another architecture)")
        for name, p in own.items():
            arr = tensors[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise BertLoadError(f"{sources}: tensor {name!r} has shape {tuple(arr.shape)}, but "
                                    f"config.json implies {tuple(p.shape)}")
            if arr.dtype.kind != "f":
                raise BertLoadError(f"{sources}: tensor {name!r} has dtype {arr.dtype}; expected floats")
            # the file's array becomes the parameter (no copy on the CPU unless dtype changes)
            p.data = xp.asarray(arr.astype(dt, copy=False))
        return model.eval()


_HEADS = ("cls.", "classifier.", "qa_outputs.")  # BertFor* heads, not part of BertModel


def _rename(key: str):
    """A checkpoint key -> our name, or None for a key BertModel does not hold."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.startswith(_HEADS) or key.endswith("position_ids"):  # position_ids: a constant buffer
        return None
    if key.endswith(".gamma"):  # TF-era checkpoints name LayerNorm parameters gamma / beta
        key = key[:-len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[:-len(".beta")] + ".bias"
    return key


def _read_weights(directory: pathlib.Path):
    """All BertModel tensors of a folder as host arrays by our names, and a label of the files."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BertLoadError(f"{index}: no 'weight_map' object")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    else:
        hint = (" (pytorch_model.bin is a pickle, which tinylora never loads; convert it to "
                "safetensors first)" if (directory / "pytorch_model.bin").exists() else "")
        raise FileNotFoundError(f"no model.safetensors in {directory}{hint}")
    tensors = {}
    for f in files:
        header, _ = read_safetensors_header(f)
        wanted = {k: _rename(k) for k in header}
        keys = [k for k, new in wanted.items() if new is not None]
        arrays, _ = load_safetensors(f, keys=keys)
        for k in keys:
            tensors[wanted[k]] = arrays[k]
    label = str(files[0]) if len(files) == 1 else f"{index} (+{len(files)} shards)"
    return tensors, label
