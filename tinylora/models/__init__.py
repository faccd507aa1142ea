"""Models: GPT (decoder LM), BERT encoder, WordPiece tokenizer, and locating bundled weights."""
