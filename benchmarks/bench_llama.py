"""tinylora's Llama vs PyTorch eager (transformers + PEFT) on the CPU, SmolLM2-135M's shapes.

    python benchmarks/bench_llama.py [--threads 2] [--rounds 3] [--json-out FILE] [--tiny]

The full run writes benchmarks/results/llama_smollm2.json (or --json-out FILE); --tiny (a
2-layer model, to check that the script works) writes only where --json-out says. A full run
starts 15 worker processes (3 rounds x 2 sides x 2 tasks, the QLoRA count, 2 memory runs) and
takes about 15 to 20 minutes on 2 cores: a training step of 4 x 256 tokens took 12 s
(tinylora) and 20 s (torch), 64 greedy tokens 10 s and 28 s, on a busy 2-vCPU VM.

Needs torch, transformers and peft next to tinylora (the package itself never imports them).
Both sides build the same random model in float32 (hidden 576, 30 layers, 9 heads over 3 K/V
heads, MLP 1536, vocab 49152, tied head) and run:
  - a LoRA fine-tuning step (r=8 on all seven projections; forward, backward, AdamW) on a
    (batch, T) batch: tokens/s = batch·T / step time;
  - greedy generation with the KV cache from a prompt: new tokens / time.
Also (tinylora only): the peak resident memory of two LoRA and two QLoRA training steps with
gradient checkpointing, as `tinylora finetune` runs them (the README's memory figures).
Each measurement runs in its own worker process, alternating tinylora and torch per round
(OpenBLAS and OpenMP threads spin-wait and steal each other's cores within one process), and
the medians are reported. Also reported: QLoRA's base, bytes per parameter of the NF4 linears.
Each figure is printed next to its target from issue 15 (TARGETS), and the JSON says whether
it was met.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
TINY = dict(SMOL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512,
            num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {"train": ("speedup_vs_torch", ">=", 1.0), "generate": ("speedup_vs_torch", ">=", 1.0),
         "qlora_base": ("bytes_per_param", "<=", 0.55)}   # issue 15's acceptance targets


def _tinylora(cfg, task, a):
    import numpy as np

    import tinylora as tl
    from tinylora import lora, quant
    tl.manual_seed(0)
    model = tl.models.Llama(tl.models.LlamaConfig(**cfg))
    rng = np.random.default_rng(0)
    if task == "qlora_bytes":
        rep = quant.quantize_model(model, print_fn=None)
        return {"bytes_per_param": rep.bytes_after / rep.params, "params": rep.params}
    if task.startswith("memory_"):   # peak RSS of training steps as `tinylora finetune` runs them
        import resource
        built = _rss_mb()
        if task == "memory_qlora":
            quant.quantize_model(model, print_fn=None)
        lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        model.gradient_checkpointing_enable()
        opt = tl.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = rng.integers(0, cfg["vocab_size"], (a.batch, a.seq + 1))
        model.train()
        for _ in range(2):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            del loss
        return {"rss_after_build_mb": built, "peak_rss_mb":
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "gradient_checkpointing": True}
    if task == "train":
        lora.inject(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        opt = tl.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = rng.integers(0, cfg["vocab_size"], (a.batch, a.seq + 1))
        model.train()

        def step():
            _, loss = model(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return _time(step, a.steps, a.batch * a.seq)
    prompt = rng.integers(0, cfg["vocab_size"], (1, a.prompt))
    return _time(lambda: model.generate(prompt, a.new, temperature=0), a.steps, a.new)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def _torch(cfg, task, a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager",
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None))
    g = torch.Generator().manual_seed(0)
    if task == "train":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq + 1), generator=g)
        model.train()

        def step():
            loss = torch.nn.functional.cross_entropy(
                model(input_ids=ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return _time(step, a.steps, a.batch * a.seq)
    model.eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, a.prompt), generator=g)

    def gen():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=a.new, min_new_tokens=a.new, pad_token_id=0)
    return _time(gen, a.steps, a.new)


def _time(fn, steps, tokens):
    fn()                                   # warm-up: allocations, BLAS threads, caches
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"seconds": med, "tokens_per_s": tokens / med}


def worker(a):
    cfg = TINY if a.tiny else SMOL
    fn = _tinylora if a.worker == "tinylora" else _torch
    if a.worker == "torch":
        import torch
        torch.set_num_threads(a.threads)
    print(json.dumps(fn(cfg, a.task, a)))


def run(side, task, a):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads),
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", side, "--task", task] + [
        f"--{k}={v}" for k, v in (("threads", a.threads), ("steps", a.steps), ("batch", a.batch),
                                  ("seq", a.seq), ("prompt", a.prompt), ("new", a.new))]
    cmd += ["--tiny"] if a.tiny else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{side} {task} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker (after one warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script runs")
    p.add_argument("--json-out", default=None,
                   help="where the JSON goes (default: benchmarks/results/llama_smollm2.json; "
                        "with --tiny: nowhere)")
    p.add_argument("--worker", choices=["tinylora", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--task", choices=["train", "generate", "qlora_bytes", "memory_lora",
                                       "memory_qlora"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    results = {"config": TINY if a.tiny else SMOL, "threads": a.threads, "batch": a.batch,
               "seq": a.seq, "prompt": a.prompt, "new_tokens": a.new,
               "machine": platform.platform(), "python": platform.python_version()}
    for task in ("train", "generate"):
        runs = {"tinylora": [], "torch": []}
        for _ in range(a.rounds):
            for side in runs:
                runs[side].append(run(side, task, a)["tokens_per_s"])
        tl_, pt = statistics.median(runs["tinylora"]), statistics.median(runs["torch"])
        results[task] = {"tinylora_tokens_per_s": tl_, "torch_tokens_per_s": pt,
                         "speedup_vs_torch": tl_ / pt, "rounds": runs}
        print(f"{task:9s} tinylora {tl_:9.1f} tok/s   torch {pt:9.1f} tok/s   "
              f"x{tl_ / pt:.2f} {_goal(results, task)}")
    results["qlora_base"] = run("tinylora", "qlora_bytes", a)
    print(f"QLoRA base: {results['qlora_base']['bytes_per_param']:.3f} bytes per parameter "
          f"of the quantized linears {_goal(results, 'qlora_base')}")
    for kind in ("lora", "qlora"):   # one training step's peak memory (batch x seq tokens)
        results[f"memory_{kind}"] = m = run("tinylora", f"memory_{kind}", a)
        print(f"{kind:5s} peak RSS {m['peak_rss_mb']:7.0f} MB over two steps of "
              f"{a.batch}x{a.seq} tokens (gradient checkpointing; {m['rss_after_build_mb']:.0f} MB "
              "after building the float32 model)")
    results["targets_met"] = all(results[k]["target_met"] for k in GOALS)
    out = a.json_out or (None if a.tiny else str(HERE / "results" / "llama_smollm2.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1) + "\n")
        print("wrote", out)


def _goal(results, key) -> str:
    """'(target >= 1.0: met)' for results[key], recording the target and verdict in it."""
    field, op, bound = GOALS[key]
    value = results[key][field]
    met = value >= bound if op == ">=" else value <= bound
    results[key].update(target=f"{field} {op} {bound}", target_met=met)
    return f"(target {op} {bound}: {'met' if met else 'NOT met'})"


if __name__ == "__main__":
    main()
