"""Models: GPT (decoder LM, and Hugging Face GPT-2 folders), BERT encoder, sentence encoder,
classifier, and locating bundled weights. Tokenizers live in tinylora.data."""
from .gpt import GPT, GPTConfig  # noqa: F401
from .bert import BertConfig, BertModel  # noqa: F401
from .sentence import SentenceEncoder  # noqa: F401
from .classify import BertClassifier  # noqa: F401
