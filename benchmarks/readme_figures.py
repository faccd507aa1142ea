"""The README's figures, written from the stored JSON in benchmarks/results/.

Every measured number in README.md sits between a pair of markers

    <!-- figures:NAME begin -->   ...   <!-- figures:NAME end -->

and is rendered here from one or two stored result files, each block naming its file and the
command that made it. A number edited by hand, or a result file changed without rewriting the
README, fails tests/test_readme_figures.py.

    python benchmarks/readme_figures.py --write README.md     # rewrite the blocks in place
    python benchmarks/readme_figures.py --check README.md     # exit 1 and name the stale blocks

Only the JSON is read (no tinylora import): a new benchmark run replaces a file and this
script turns it into prose; keys a newer run adds are ignored.
"""
from __future__ import annotations

import argparse
import json
import re
import textwrap
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20

# each stored result file -> the command that made it (and which of its outputs, if not stdout)
COMMANDS = {
    "demo.json": ("tinylora demo --out DIR", "DIR/metrics.json, absolute paths removed"),
    "classify.json": ("OPENBLAS_NUM_THREADS=1 tinylora classify --out DIR", "DIR/metrics.json"),
    "compare_torch.json": "python benchmarks/compare_torch.py --threads 2 --rounds 12 "
                          "--baseline DIR --json-out benchmarks/results/compare_torch.json",
    "lora_vs_full_gpt-6x384.json": "tinylora bench lora --config gpt-6x384",
    "infer_gpt-6x384.json": "tinylora bench infer --config gpt-6x384",
    "infer_nanogpt-cpu.json": "tinylora bench infer --config nanogpt-cpu",
    "encode_threads2.json": "PYTHONPATH=. python benchmarks/bench_encode.py --threads 2 --baseline DIR",
    "encode_threads1.json": "PYTHONPATH=. python benchmarks/bench_encode.py --threads 1 --baseline DIR",
    "qlora.json": "tinylora bench qlora",
    "llama_smollm2.json": "PYTHONPATH=. python benchmarks/bench_llama.py --threads 2 --json-out "
                          "benchmarks/results/llama_smollm2.json (needs torch, transformers, peft)",
    "memory.json": "PYTHONPATH=. python benchmarks/bench_memory.py --json-out "
                   "benchmarks/results/memory.json",
    "memory_before.json": "PYTHONPATH=DIR python benchmarks/bench_memory.py --json-out "
                          "benchmarks/results/memory_before.json (DIR: the checkout before)",
    "busy.json": "PYTHONPATH=. python benchmarks/bench_busy.py --json-out benchmarks/results/busy.json",
    "generate_threads2.json": "PYTHONPATH=. python benchmarks/bench_generate.py --threads 2 "
                              "--baseline DIR --json-out benchmarks/results/generate_threads2.json",
    "generate_threads1.json": "PYTHONPATH=. python benchmarks/bench_generate.py --threads 1 "
                              "--baseline DIR --json-out benchmarks/results/generate_threads1.json",
}
# each README block -> the files it is written from
SOURCES = {
    "demo": ["demo.json"],
    "classify": ["classify.json"],
    "compare-torch": ["compare_torch.json"],
    "lora-vs-full": ["lora_vs_full_gpt-6x384.json", "compare_torch.json"],
    "infer": ["infer_gpt-6x384.json", "infer_nanogpt-cpu.json"],
    "encode": ["encode_threads2.json", "encode_threads1.json"],
    "qlora": ["qlora.json"],
    "llama": ["llama_smollm2.json"],
    "memory": ["memory.json", "memory_before.json"],
    "busy": ["busy.json"],
    "generate": ["generate_threads2.json", "generate_threads1.json"],
}

# the project's goals, stated next to the measured figure (not measurements)
TARGET_RATIO = {"full": "≥ 1.0", "lora": "≥ 1.3"}


def load(name: str):
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def source_line(name: str) -> str:
    made = []
    for f in SOURCES[name]:
        cmd, what = COMMANDS[f] if isinstance(COMMANDS[f], tuple) else (COMMANDS[f], None)
        made.append(f"[`{f}`](benchmarks/results/{f}) by `{cmd}`" + (f" ({what})" if what else ""))
    return f"<sub>From {'; '.join(made)}.</sub>"


def wrap(text: str, indent: str = "") -> str:
    """A prose paragraph or bullet wrapped like the rest of the README (95 columns)."""
    return textwrap.fill(text, width=95, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def load_note(cpu_count) -> str:
    return (f"Timings were measured on a {cpu_count}-core VM shared with other jobs: they are "
            "rough and drift between runs; counts, sizes, losses and accuracies do not depend "
            "on the load.")


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _pct(v: float) -> str:
    return f"{v:.3f}" if v < 0.1 else f"{v:.1f}" if v < 10 else f"{v:.0f}"


def _mib(n_bytes: float, digits: int = 2) -> str:
    return f"{n_bytes / MIB:.{digits}f} MiB"


def _openblas(libs) -> str:
    for lib in libs or []:
        if lib.get("internal_api") == "openblas":
            return ".".join(str(lib.get("version", "?")).split(".")[:3])
    return "?"


def demo() -> str:
    d = load("demo.json")
    s, base, m = d["settings"], d["base"], d["methods"]
    full, lo, q = m["full"], m["lora"], m["qlora"]
    rows = []
    for key, label in (("full", "full"), ("lora", "LoRA"), ("qlora", "QLoRA")):
        r = m[key]
        rows.append(f"| {label} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
                    f"{r['val_before']:.3f} → {r['val_after']:.3f} | {r['ms_per_step']:.0f} | "
                    f"{r['peak_rss_mb']:.0f} MiB | {_mib(r['state_bytes'])} | "
                    f"{_mib(r['saved_bytes'])} (`{r['saved_file'] if key == 'full' else r['saved'] + '/'}`) |")
    gap = lo["val_after"] - full["val_after"]
    ahead = [s_ for (s_, v), (_, w) in zip(lo["curve"], full["curve"]) if 0 < s_ and v < w]
    bits = re.search(r"\(([\d.]+) bits\)", q["quantized"] or "")
    n_q = re.search(r"quantized (\d+) Linear", q["quantized"] or "")
    mach = d["machine"]
    return "\n".join([
        source_line("demo"),
        "",
        f"`tinylora demo` with its default settings (seed {s['seed']}): a {s['n_layer']}-layer GPT "
        f"(n_embd {s['n_embd']}, context {s['block_size']}, {base['params']:,} parameters) "
        f"pretrained for {base['steps']:,} steps on `{s['base_data']}` (validation loss "
        f"{base['val_after']:.3f}), then fine-tuned for {s['finetune_iters']} steps of "
        f"{s['batch_size']} × {s['block_size']} characters on `{s['target_data']}` by each method. "
        "Validation loss is the mean cross-entropy in nats per character on the same held-out "
        "Python windows.",
        "",
        "| method | trainable | trainable % | val loss before → after | ms/step | peak RSS "
        "| train state | saved file |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"- LoRA (r = {s['lora_r']}, α = {s['lora_alpha']:g} on every Linear of the blocks) trains "
        f"{lo['trainable_pct']:.0f}% of the weights and ends {abs(gap):.2f} nats "
        f"{'above' if gap > 0 else 'below'} full fine-tuning"
        + (f" (it is ahead at the evaluations of steps {', '.join(map(str, ahead))}: see "
           "`tinylora-demo/loss_curves.png`)" if ahead else "")
        + f"; its file is {full['saved_bytes'] / lo['saved_bytes']:.0f} times smaller. QLoRA's "
        f"\"before\" is the 4-bit base (the {n_q.group(1) if n_q else '?'} Linear layers at "
        f"{float(bits.group(1)) if bits else float('nan'):.2f} bits per weight, state included).",
        "- At this size a LoRA step costs about what a full step costs: the frozen weights still "
        "run forward and pass gradients to their inputs. LoRA saves their weight gradients and "
        "AdamW moments (\"train state\": weights + gradients + AdamW moments, counted) and the "
        "file. A QLoRA step dequantizes each 4-bit weight in the forward and again in the backward.",
        "- ms/step leaves the evaluations out. Peak RSS is the high-water mark of each phase's own "
        "process, the interpreter and NumPy included.",
        f"- Time: {d['seconds']:.0f} s from scratch ({d['cpu_seconds']:.0f} s of CPU). Machine: "
        f"{mach['cpu_count']} CPUs ({mach['processor']}), {mach['platform'].split('-')[0]}, "
        f"Python {mach['python']}, NumPy {mach['numpy']} with OpenBLAS "
        f"{_openblas(mach['blas'])}, {d['blas_threads']} BLAS thread per phase (the demo's "
        f"default). {load_note(mach['cpu_count'])}",
    ])


def classify() -> str:
    d = load("classify.json")
    labels = {"probe": "linear probe on frozen embeddings",
              "lora": "LoRA r={r} (q, k, v and the 3 dense layers; head in `modules_to_save`)",
              "full": "full fine-tuning"}
    s, data = d["settings"], d["data"]
    rows = []
    for r in d["results"]:
        saved = r["saved_bytes"]
        size = f"{saved / 1e3:.1f} kB" if saved < 1e6 else f"{saved / 1e6:.1f} MB"
        rows.append(f"| {labels[r['method']].format(r=s['lora_r'])} | {r['test_accuracy']:.3f} | "
                    f"{r['trainable_params']:,} | {_pct(r['trainable_pct'])} | {size} | "
                    f"{_ms(1000 * r['sec_per_step'])} | {r['peak_train_mb']:.1f} | {r['seconds']:.0f} |")
    n = data["train"] + data["test"]
    return "\n".join([
        source_line("classify"),
        "",
        f"Fine-tuning it on tinylora's built-in task (who performs the action — "
        f"{', '.join(map(_a, data['classes'][:-1]))} or {_a(data['classes'][-1])} — in {n:,} generated "
        f"sentences where only word order and voice tell; {data['train']} train / {data['test']} "
        f"held out), `tinylora classify` or `python examples/minilm_lora.py`: {s['steps']} steps "
        f"of {s['batch_size']} sentences for LoRA and full fine-tuning, {s['probe_steps']} "
        "full-batch steps for the probe.",
        "",
        "| method | held-out accuracy | trainable | % | saved | ms/step | peak MB (training) | s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "(Peak MB: memory allocated during training beyond the model's weights; s: the whole "
        f"method, loading and evaluation included. {load_note(d['machine']['cpu_count'])})",
    ])


def _machine(d: dict) -> str:
    blas = next((r.get("blas", {}).get("tinylora") for r in d["results"] if r.get("blas")), [])
    return "\n".join([
        f"Measured on this project's development machine on {d['date']}: a {d['cpu_count']}-vCPU "
        f"{d['processor'].replace('(R)', '').replace(' Processor', '')} VM, Python {d['python']}, NumPy {d['numpy']} with OpenBLAS "
        f"{_openblas(blas)} ({d['threads']} threads; float32 GEMM peak {d['gemm_peak_gflops']:.0f} "
        f"GFLOP/s measured by the same run), PyTorch {d['torch'].split('+')[0]} CPU with "
        f"{d['threads']} threads. The VM is shared with other machines, so absolute times drift "
        "between runs; each ratio comes from one run that measured both sides. The JSON each "
        "figure comes from is in "
        "[benchmarks/results/](benchmarks/results/), named above it with its command.",
    ])


def compare_torch() -> str:
    d = load("compare_torch.json")
    rows, last = [], None
    for r in d["results"]:
        cfg = (f"{r['n_layer']} layers, {r['n_embd']} wide, block {r['block_size']}, "
               f"batch {r['batch_size']}")
        mode = "full" if r["mode"] == "full" else "LoRA r=8"
        rows.append(f"| {cfg if cfg != last else ''} | {mode} | {_ms(r['tinylora_ms'])} | "
                    f"{_ms(r['torch_ms'])} | {r['ratio_tokens_per_s']:.2f} | "
                    f"{TARGET_RATIO.get(r['mode'], '')} | {r['tinylora_gflops']:.0f} "
                    f"({100 * r['tinylora_mfu']:.0f}%) | {r['tinylora_peak_rss_mb']:.0f} / "
                    f"{r['torch_peak_rss_mb']:.0f} MB |")
        last = cfg
    return "\n".join([
        source_line("compare-torch"),
        "",
        _machine(d),
        "",
        "**Training step vs PyTorch eager** (needs `pip install torch==2.13.0`; each side in its "
        "own worker process, rounds alternating):",
        "",
        "| config | mode | tinylora ms/step | PyTorch ms/step | tokens/s ratio | target "
        "| tinylora GFLOP/s (MFU) | peak RSS tinylora / PyTorch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        *_against_baseline(d),
    ])


def _against_baseline(d: dict) -> list:
    """The same run's third side (--baseline DIR): the code before a change, timed alike."""
    rs = [r for r in d["results"] if "ratio_vs_baseline" in r]
    if not rs:
        return []
    lo, hi = min(r["ratio_vs_baseline"] for r in rs), max(r["ratio_vs_baseline"] for r in rs)
    return ["", f"The same run also timed {rs[0]['baseline']} with `--baseline`: this code runs at "
                f"{lo:.3f}–{hi:.3f}x its speed on these four steps."]


def lora_vs_full() -> str:
    d = load("lora_vs_full_gpt-6x384.json")[0]
    f, lo, ck = d["full"], d["lora"], d["lora_checkpointing"]
    moments = 3 * 4 * f["trainable_params"] / 1e6   # fp32 gradient + AdamW's two moments
    torch_run = [r["tinylora_ms"] for r in load("compare_torch.json")["results"]
                 if r["config"] == d["config"] and r["mode"] == "full"]
    return "\n".join([
        source_line("lora-vs-full"),
        "",
        "**LoRA's own promise** (each mode in a fresh process):",
        "",
        "| | ms/step | peak RSS | vs full: time | vs full: memory |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| full fine-tuning | {f['ms_per_step']:.0f} | {f['peak_rss_mb']:.0f} MB | 1 | 1 |",
        f"| LoRA r=8 (attention and MLP linears) | {lo['ms_per_step']:.0f} | "
        f"{lo['peak_rss_mb']:.0f} MB | {d['time_ratio']:.2f} (target ≤ 0.75) | "
        f"{d['peak_rss_ratio']:.2f} (target ≤ 0.6) |",
        f"| LoRA + activation checkpointing | {ck['ms_per_step']:.0f} | {ck['peak_rss_mb']:.0f} MB "
        f"| {d['checkpointing_time_ratio']:.2f} | {d['checkpointing_peak_rss_ratio']:.2f} |",
        "",
        "At this size the step is dominated by activations, not weights: LoRA drops the weight "
        f"gradients and AdamW's moments ({f['trainable_params']:,} × 12 B = {moments:.0f} MB) but "
        "both keep the activations. Activation checkpointing "
        "(`model.gradient_checkpointing_enable()`) keeps only each block's input and recomputes "
        f"the block in backward: memory falls to {d['checkpointing_peak_rss_ratio']:.2f}x of full "
        "fine-tuning, for one extra forward pass."
        + (f" The same full step took {torch_run[0]:.0f} ms in the PyTorch comparison's run: "
           "compare ratios within one run, not times across runs." if torch_run else ""),
    ])


def infer() -> str:
    big, small = load("infer_gpt-6x384.json")[0], load("infer_nanogpt-cpu.json")[0]
    return "\n".join([
        source_line("infer"),
        "",
        f"**Inference**: a merged LoRA model runs at the base model's speed "
        f"({big['merged_vs_base']:.3f}x on the 6-layer config, {small['merged_vs_base']:.3f}x on "
        f"the small one; target within 3%); unmerged adapters at r = 8 cost "
        f"{100 * (big['unmerged_vs_base'] - 1):.1f}% extra on the 6-layer config (target ≤ 10%) "
        f"and {100 * (small['unmerged_vs_base'] - 1):.0f}% on the small one.",
    ])


def encode() -> str:
    two, one = load("encode_threads2.json"), load("encode_threads1.json")
    sps = lambda d, k: d["sentences_per_s"][k]  # noqa: E731
    return "\n".join([
        source_line("encode"),
        "",
        f"**MiniLM encode** (with sentence-transformers installed; batch {two['batch_size']}, "
        f"{two['mean_tokens']} tokens per sentence): {sps(two, 'tinylora'):.0f} vs "
        f"{sps(two, 'sentence-transformers'):.0f} sentences/s with {two['threads']} threads "
        f"({two['ratio_tinylora_over_st']:.2f}x), {sps(one, 'tinylora'):.0f} vs "
        f"{sps(one, 'sentence-transformers'):.0f} with {one['threads']} thread "
        f"({one['ratio_tinylora_over_st']:.2f}x); target ≥ 1.0x. Embeddings agree to cosine "
        f"{min(two['min_cosine'], one['min_cosine']):.7f}.",
    ])


def qlora() -> str:
    d = load("qlora.json")[0]
    g, mx = d["gpt"], d["matrix"]
    gq = g["qlora"]
    bpp = gq["frozen_base_bytes_per_param"]
    q_gbps = sorted([mx["double_quant"]["quantize_GBps"], mx["plain"]["quantize_GBps"]])
    dq_gbps = sorted([mx["double_quant"]["dequantize_GBps"], mx["plain"]["dequantize_GBps"]])
    err = mx["mean_abs_error_N01"]
    return "\n".join([
        source_line("qlora"),
        "",
        f"**QLoRA**: the frozen 6-layer GPT base takes {bpp:.3f} bytes per parameter with double "
        f"quantization ({8 * bpp:.2f} bits; target ≤ 0.52), {gq['weight_mb']:.2f} MB instead of "
        f"{g['lora']['weight_mb']:.1f} MB; a {mx['qlora']['shape'][0]} × {mx['qlora']['shape'][1]} "
        f"matrix {mx['qlora']['frozen_base_bytes_per_param']:.3f} bytes/param. Training peak "
        f"{gq['train_peak_rss_mb']:.0f} MB (QLoRA) vs {g['lora']['train_peak_rss_mb']:.0f} MB "
        f"(LoRA) on the GPT, step time {g['step_time']['qlora_over_lora']:.2f}x LoRA's "
        f"({mx['step_time']['qlora_over_lora']:.2f}x on the single large matrix, where "
        "dequantizing is a large share of the step). NF4 quantizes at "
        f"{q_gbps[0]:.2f}–{q_gbps[1]:.2f} GB/s and dequantizes at {dq_gbps[0]:.1f}–{dq_gbps[1]:.1f} "
        f"GB/s; mean absolute error on N(0, 1) weights: NF4 {err['nf4']:.4f}, int4 absmax "
        f"{err['int4']:.4f}, FP4 {err['fp4']:.4f}.",
    ])


def llama_counts(c: dict, r: int = 8) -> dict:
    """Parameter counts of a Llama config (HF field names), and of rank-r adapters on it."""
    C, L, I, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or C // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
              "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}   # (in, out)
    proj = L * sum(i * o for i, o in shapes.values())
    emb = V * C * (1 if c.get("tie_word_embeddings", True) else 2)
    norms = (2 * L + 1) * C
    return {"C": C, "L": L, "I": I, "V": V, "hd": hd, "kv": kv, "proj": proj, "emb": emb,
            "norms": norms, "total": proj + emb + norms, "n_proj": L * len(shapes), "r": r,
            "qv": L * r * sum(sum(shapes[k]) for k in ("q_proj", "v_proj")),
            "all": L * r * sum(i + o for i, o in shapes.values())}


def llama() -> str:
    d = load("llama_smollm2.json")
    c, n = d["config"], llama_counts(d["config"])
    bpp = d["qlora_base"]["bytes_per_param"]
    mb = 1e6
    base_q = n["proj"] * bpp + (n["emb"] + n["norms"]) * 4
    tr, ge, ml, mq = d["train"], d["generate"], d["memory_lora"], d["memory_qlora"]
    return "\n".join([
        source_line("llama"),
        "",
        f"What it takes in memory, counted from the shapes (hidden {n['C']}, {n['L']} layers, "
        f"{c['num_attention_heads']} query and {c['num_key_value_heads']} K/V heads of {n['hd']}, "
        f"MLP {n['I']}, vocabulary {n['V']:,}, tied head): {n['total'] / 1e6:.1f}M parameters, of "
        f"which the {n['n_proj']} projections hold {n['proj'] / 1e6:.1f}M and the embedding "
        f"{n['emb'] / 1e6:.1f}M. tinylora computes in float32 (4 bytes per value; a bf16 file is "
        "widened on loading). An adapter of rank r on a d_in × d_out projection has "
        "r·(d_in + d_out) values, and training keeps each trainable value 4 times (weight, "
        "gradient, AdamW's two moments). The 4-bit projections take the bytes per parameter "
        "measured below, quant-state records included.",
        "",
        "| | base weights | adapters, r=8 (trainable) | adapters + gradients + AdamW |",
        "| --- | ---: | ---: | ---: |",
        f"| LoRA, float32 base | {n['total'] * 4 / mb:.0f} MB | q_proj,v_proj: "
        f"{n['qv'] / 1e6:.2f}M ({n['qv'] * 4 / mb:.1f} MB); all-linear: {n['all'] / 1e6:.2f}M "
        f"({n['all'] * 4 / mb:.1f} MB) | {n['qv'] * 16 / mb:.1f} MB; {n['all'] * 16 / mb:.0f} MB |",
        f"| QLoRA, NF4 projections | {n['proj'] * bpp / mb:.0f} MB projections + "
        f"{(n['emb'] + n['norms']) * 4 / mb:.0f} MB embedding and norms = {base_q / mb:.0f} MB "
        "| the same | the same |",
        "",
        f"Measured on a random model of these shapes ({d['threads']} threads, batch {d['batch']} × "
        f"{d['seq']} tokens, all-linear adapters, gradient checkpointing as the command line "
        f"uses): peak resident size {ml['peak_rss_mb'] / 1e3:.2f} GB with LoRA and "
        f"{mq['peak_rss_mb'] / 1e3:.2f} GB with QLoRA (the model is built in float32 before its "
        f"projections are quantized, so QLoRA lowers the steady state more than the peak); the "
        f"4-bit base takes {bpp:.3f} bytes per parameter (target ≤ 0.55). Against transformers + "
        f"PEFT in PyTorch eager on the same shapes: LoRA fine-tuning {tr['tinylora_tokens_per_s']:,.0f} "
        f"vs {tr['torch_tokens_per_s']:,.0f} tokens/s ({tr['speedup_vs_torch']:.2f}x; target "
        f"≥ 1.0), generation with the KV cache {ge['tinylora_tokens_per_s']:,.1f} vs "
        f"{ge['torch_tokens_per_s']:,.1f} tokens/s ({ge['speedup_vs_torch']:.2f}x; target ≥ 1.0).",
    ])


def memory() -> str:
    after, before = load("memory.json"), load("memory_before.json")
    a = {r["mode"]: r for r in after["results"]}
    b = {r["mode"]: r for r in before["results"]}
    rows = []
    for mode, label in (("full", "full fine-tuning"), ("lora", "LoRA r=8")):
        rows.append(f"| {label} | {b[mode]['peak_rss_mb']:.0f} → {a[mode]['peak_rss_mb']:.0f} MB | "
                    f"{b[mode]['kept_for_backward_mb']:.0f} → {a[mode]['kept_for_backward_mb']:.0f} MB | "
                    f"{b[mode]['step_ms']:.0f} → {a[mode]['step_ms']:.0f} |")
    lb, la = b["lora"]["kept_by_class_mb"], a["lora"]["kept_by_class_mb"]
    classes = sorted(set(lb) | set(la), key=lambda k: (-max(lb.get(k, 0), la.get(k, 0)), k))
    cls = [f"| {k} | {lb.get(k, 0):.1f} | {la.get(k, 0):.1f} |" for k in classes
           if max(lb.get(k, 0), la.get(k, 0)) >= 1]
    fixed = a["full"]["grads_mb"] + a["full"]["optimizer_state_mb"]
    return "\n".join([
        source_line("memory"),
        "",
        f"**What a training step keeps for backward** ({after['n_layer']} layers, "
        f"{after['n_embd']} wide, block {after['block_size']}, batch {after['batch_size']}; each "
        "mode in a fresh process; before → after this round's kernels):",
        "",
        "| mode | peak RSS | kept for backward | ms/step |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"LoRA's peak is {before['lora_over_full_peak']:.2f}x full fine-tuning's before and "
        f"{after['lora_over_full_peak']:.2f}x after (target ≤ 0.6). The kernels no longer keep "
        "attention's probabilities (each row's max and 1/sum instead, the probabilities "
        "recomputed per chunk in backward), GELU's tanh or layer norm's x̂ (recomputed from the "
        "input); small ones (attention's within one 1 MiB chunk, GELU's up to 2 MiB) are still "
        "kept, as not worth a recompute. Every value and gradient is the same bit for bit. What "
        "LoRA keeps, by class "
        "(MB, `tinylora.memory.by_class`):",
        "",
        "| kept by | before | after |",
        "| --- | ---: | ---: |",
        *cls,
        "",
        f"Full fine-tuning adds {fixed:.0f} MB of weight gradients and AdamW moments to the "
        f"same activations, and the process starts at {a['lora']['rss_after_build_mb']:.0f} MB "
        "(interpreter, NumPy, weights). What is left is what backward reads: each linear's "
        "input, the attention's q, k, v and output, the MLP's hidden activation. A 0.6 ratio "
        "needs LoRA's peak at 1.5x the gradients and moments, which leaves less room than those "
        "inputs take: only recomputing whole blocks (activation checkpointing, above) gets there.",
    ])


def busy() -> str:
    d = load("busy.json")
    r = d["results"][0]
    counts = r["threads_chosen"]["loaded_default"]
    chosen = ", ".join(f"{n} thread{'s' if n != '1' else ''} in {c} of {sum(counts.values())} "
                       "timed steps" for n, c in counts.items())
    return "\n".join([
        source_line("busy"),
        "",
        f"**On a busy machine** ({r['n_layer']} layers, {r['n_embd']} wide, {r['mode']} "
        f"fine-tuning through the Trainer, {r['cores']} cores, one of them kept busy by another "
        f"process; medians of {r['rounds']} alternating rounds): the default step took "
        f"{r['loaded_default_over_quiet']:.2f}x its quiet time (target ≤ "
        f"{r['target_loaded_over_quiet']}; the rule chose {chosen} under load), against "
        f"{r['loaded_all_over_quiet']:.2f}x with all {r['cores']} threads fixed and "
        f"{r['loaded_one_over_quiet']:.2f}x with 1 thread fixed. Quiet: "
        f"{r['quiet_default_ms']:.0f} ms per step."
        + (f" One thread on the quiet machine takes {r['quiet_one_over_quiet']:.2f}x: with one of "
           f"{r['cores']} cores taken, that is the floor, and the step spends its time where a "
           "second core helps." if "quiet_one_over_quiet" in r else ""),
    ])


def generate() -> str:
    two, one = load("generate_threads2.json"), load("generate_threads1.json")
    rows = []
    for d in (two, one):
        for r in d["results"]:
            base = f" | {r['ratio_vs_baseline']:.2f}" if "ratio_vs_baseline" in r else " | "
            rows.append(f"| {d['threads']} | {r['batch_size']} | {r['tinylora_tokens_per_s']:.0f} | "
                        f"{r['torch_tokens_per_s']:.0f} | {r['ratio_tokens_per_s']:.2f}{base} |")
    r0 = two["results"][0]
    return "\n".join([
        source_line("generate"),
        "",
        f"**Generation with the KV cache** ({r0['config']}, greedy, {r0['prompt_tokens']}-token "
        f"prompt, {r0['new_tokens']} new tokens per row, PyTorch eager with the same cache; the "
        "tokens are equal on both sides; target ≥ 1.0):",
        "",
        "| threads | batch | tinylora tokens/s | PyTorch tokens/s | ratio | vs before this round |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])


RENDER = {"demo": demo, "classify": classify, "compare-torch": compare_torch,
          "lora-vs-full": lora_vs_full, "infer": infer, "encode": encode, "qlora": qlora,
          "llama": llama, "memory": memory, "busy": busy, "generate": generate}
assert RENDER.keys() == SOURCES.keys()


def _format(body: str) -> str:
    """Wrap the prose lines (one paragraph or bullet each); tables and the source line stay."""
    out = []
    for line in body.split("\n"):
        if not line or line.startswith(("|", "<sub>")):
            out.append(line)
        else:
            out.append(wrap(line, "  " if line.startswith("- ") else ""))
    return "\n".join(out)


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- figures:{re.escape(name)} begin -->\n)(.*?)(<!-- figures:"
                      rf"{re.escape(name)} end -->)", re.S)


def render(text: str) -> str:
    """``text`` with every figures block rewritten from the stored JSON."""
    for name, fn in RENDER.items():
        pattern = _block(name)
        found = len(pattern.findall(text))
        if found != 1:
            raise ValueError(f"README: expected one '<!-- figures:{name} begin/end -->' block, "
                             f"found {found}")
        body = _format(fn())
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
    return text


def stale(text: str) -> list:
    """Names of the blocks whose text differs from what the stored JSON gives."""
    want = render(text)
    return [n for n in RENDER if _block(n).search(text).group(2) != _block(n).search(want).group(2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="README", help="rewrite the figures blocks in place")
    g.add_argument("--check", metavar="README", help="exit 1 if a block differs from the JSON")
    args = p.parse_args(argv)
    path = Path(args.write or args.check)
    text = path.read_text(encoding="utf-8")
    if args.write:
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: {len(RENDER)} figures blocks written from {RESULTS}")
        return 0
    bad = stale(text)
    if bad:
        print(f"{path}: stale figures blocks: {', '.join(bad)}; run "
              f"python benchmarks/readme_figures.py --write {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
