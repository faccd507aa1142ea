"""Models: GPT and Llama (decoder LMs, and their Hugging Face folders), BERT encoder, sentence
encoder, classifier, and locating bundled weights. Tokenizers live in tinylora.data
(``BPETokenizer`` is re-exported here, next to the models that use it)."""
from .gpt import GPT, GPTConfig  # noqa: F401
from .bert import BertConfig, BertModel  # noqa: F401
from .sentence import SentenceEncoder  # noqa: F401
from .classify import BertClassifier  # noqa: F401
from .llama import Llama, LlamaConfig  # noqa: F401
from ..data.bpe import BPETokenizer  # noqa: F401
