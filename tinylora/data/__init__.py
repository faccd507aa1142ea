"""Data: text corpora and batches, tokenizers, and small labelled tasks generated in code.

  text.py       character tokenizer, built-in corpora, text loading, batches, splits
  gpt2_bpe.py   GPT-2's byte-level BPE tokenizer (reads a Hugging Face folder)
  wordpiece.py  BERT's WordPiece tokenizer (reads vocab.txt / tokenizer.json)
  agents.py     the built-in labelled task for the MiniLM fine-tune (no download)

``from tinylora.data import load_data, CharTokenizer, ...`` reads the text helpers.
"""
from .text import (BUILTIN_CORPORA, BUILTIN_VOCAB, CharTokenizer, TextData,  # noqa: F401
                   builtin_text, get_batch, load_data, load_text, normalize_ascii, read_corpus,
                   train_val_split)
from .agents import AGENT_CLASSES, TextClassificationData, agent_task  # noqa: F401

__all__ = ["CharTokenizer", "BUILTIN_VOCAB", "BUILTIN_CORPORA", "builtin_text", "load_text",
           "read_corpus", "train_val_split", "get_batch", "TextData", "load_data",
           "normalize_ascii", "AGENT_CLASSES", "TextClassificationData", "agent_task"]
