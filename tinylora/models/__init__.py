"""Models: GPT and Llama (decoder LMs), BERT encoder, WordPiece and BPE tokenizers, and locating bundled weights."""
from .gpt import GPT, GPTConfig  # noqa: F401
from .bert import BertConfig, BertModel  # noqa: F401
from .sentence import SentenceEncoder  # noqa: F401
from .classify import BertClassifier  # noqa: F401
from .llama import Llama, LlamaConfig  # noqa: F401
from .hf_tokenizer import BPETokenizer  # noqa: F401
