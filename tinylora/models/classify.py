"""BertClassifier: a BERT encoder, mean pooling and a linear ``classifier`` head.

Names follow Hugging Face's BertForSequenceClassification (``bert``, ``dropout``,
``classifier``), so LoRA targets read ``bert.encoder.layer.0.attention.self.query`` and the
head goes into LoRA's ``modules_to_save=["classifier"]``. One difference: the sentence
vector is the mean of the token states over real tokens (sentence-transformers' pooling, which
all-MiniLM-L6-v2 was trained for), not HF's tanh pooler on [CLS].
"""
from __future__ import annotations

from .. import functional as F
from .. import nn
from ..tensor import Tensor
from .bert import BertModel
from .sentence import mean_pool

__all__ = ["BertClassifier"]


class BertClassifier(nn.Module):
    """(input_ids, attention_mask) (B, T) -> (logits (B, num_labels), loss or None)."""

    def __init__(self, bert: BertModel, num_labels: int, dropout: float | None = None):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"BertClassifier: num_labels must be at least 2, got {num_labels}")
        self.bert = bert
        self.num_labels = num_labels
        p = bert.config.hidden_dropout_prob if dropout is None else dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)

    @classmethod
    def from_pretrained(cls, directory, num_labels: int, dropout: float | None = None,
                        dtype=None) -> "BertClassifier":
        """A pretrained encoder from a HF BERT folder with a new, randomly initialised head.
        The checkpoint's pooler is dropped: mean pooling does not use it."""
        bert = BertModel.from_pretrained(directory, dtype=dtype)
        bert.pooler = None
        return cls(bert, num_labels, dropout)

    def embed(self, input_ids, attention_mask=None, token_type_ids=None,
              adapter_names=None) -> Tensor:
        """The mean-pooled sentence vectors (B, H) the head sees."""
        h = self.bert(input_ids, attention_mask, token_type_ids, adapter_names)  # (B, T, H)
        if attention_mask is None:
            return h.mean(dim=1)
        return mean_pool(h, attention_mask)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                adapter_names=None):
        """labels (B,) class ids: also return the mean cross-entropy loss."""
        pooled = self.embed(input_ids, attention_mask, token_type_ids, adapter_names)
        if adapter_names is None:
            logits = self.classifier(self.dropout(pooled))           # (B, num_labels)
        else:  # the head may be an adapter's own copy (modules_to_save): route it too
            with nn.adapter_routing(adapter_names):
                logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return logits, loss
