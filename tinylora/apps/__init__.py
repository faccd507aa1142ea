"""Applications built on the library, which the command line calls:

  demo.py      `tinylora demo`: pretrain a GPT, then full vs LoRA vs QLoRA fine-tunes
  finetune.py  fine-tuning a GPT checkpoint (LoRA, QLoRA, full): CLI, demo, examples
  classify.py  MiniLM on a labelled task: linear probe vs LoRA vs full fine-tune
  bench.py     benchmark figures (ms/step, tokens/s, memory) as JSON
  bench_qlora.py  QLoRA figures: 4-bit storage, speed and error, LoRA vs QLoRA fine-tunes
  report.py    plain-text tables for printed reports

Nothing in the library below imports these modules.
"""
