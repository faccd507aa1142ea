"""`tinylora demo`: pretrain a small GPT on English, then teach it Python three ways.

    from tinylora.apps.demo import run_demo
    results = run_demo("tinylora-demo", quick=True)      # the same dict metrics.json holds

1. Pretrain a character-level GPT on ``builtin:prose`` (or reuse ``<out>/base/`` when it
   holds a finished base of the same settings and seed).
2. Fine-tune copies of it on ``builtin:python`` by full fine-tuning, LoRA and QLoRA (the
   frozen Linear weights in 4-bit NF4, LoRA on top), with the same steps and data order.
3. Report, per method: trainable parameters, the target-domain validation loss before and
   after, time per step, peak memory, the size of what is saved; samples from the base and
   the adapted models (same prompt, same seed); loss curves; the autograd graph of one LoRA
   layer.

Memory: each phase runs in its own Python process (``isolate=True``), and the table's
"peak RSS" is that process's resident-set high-water mark (``getrusage``): the interpreter,
NumPy and the data are in it too, so the methods differ by less than their weights do. The
"train state" column is counted instead of measured: weights and buffers, plus a gradient
and two AdamW moments per trainable value (what training keeps between steps).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

__all__ = ["DemoSettings", "SETTINGS", "QUICK", "run_demo", "format_report"]


@dataclass
class DemoSettings:
    # the model: a small GPT-2-shaped character model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    # pretraining on the base domain
    base_data: str = "builtin:prose"
    pretrain_iters: int = 1000
    pretrain_lr: float = 2e-3
    # fine-tuning on the target domain, the same steps for every method
    target_data: str = "builtin:python"
    finetune_iters: int = 200
    full_lr: float = 2e-3
    lora_lr: float = 8e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    eval_interval: int = 50
    eval_iters: int = 10
    seed: int = 0
    # samples
    prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.8

    def base_train_config(self, progress: bool):
        from ..train import TrainConfig
        return TrainConfig(max_iters=self.pretrain_iters, batch_size=self.batch_size,
                           lr=self.pretrain_lr, warmup_iters=max(1, self.pretrain_iters // 20),
                           eval_interval=max(1, self.pretrain_iters // 4), eval_iters=self.eval_iters,
                           checkpoint_interval=0, keep_checkpoints=1, seed=self.seed,
                           progress=progress)

    def finetune_train_config(self, method: str, progress: bool):
        from ..train import TrainConfig
        return TrainConfig(max_iters=self.finetune_iters, batch_size=self.batch_size,
                           lr=self.full_lr if method == "full" else self.lora_lr,
                           warmup_iters=max(1, self.finetune_iters // 10), weight_decay=0.0,
                           eval_interval=self.eval_interval, eval_iters=self.eval_iters,
                           seed=self.seed + 1, progress=progress)

    def lora_config(self):
        from ..lora import LoraConfig
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules)


# Measured on a 2-core VM: 132 s idle (128 s of CPU), 150-175 s of CPU when it was busy. The learning rates are the best of a small
# sweep at 200 steps (LoRA 4e-3 / 8e-3 / 1.5e-2, full 1e-3 / 2e-3); rank 16 or 32 gained less
# than 0.03. The base matters most: after 600 pretraining steps LoRA ended 0.08 above full
# fine-tuning, after 1,000 steps 0.04 (a better base leaves less to learn in full rank).
SETTINGS = DemoSettings()
# --quick: the same pipeline at the smallest size that still shows the effect
QUICK = DemoSettings(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=16,
                     pretrain_iters=400, pretrain_lr=3e-3, finetune_iters=80, lora_lr=1e-2,
                     full_lr=3e-3, eval_interval=20, eval_iters=4, sample_tokens=120)

METHODS = ("full", "lora", "qlora")
_SAVED = {"full": "full", "lora": "lora-adapter", "qlora": "qlora-adapter"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- phases
# Each phase is a function of (settings, out folder) returning a JSON-able dict, so it can
# run in this process or in a child process (`python -m tinylora.apps.demo --phase ...`).

def _base_dir(out) -> str:
    return os.path.join(os.fspath(out), "base")


def _cached_base(s: DemoSettings, out):
    """(checkpoint folder, None) when <out>/base/ holds a finished base made with these
    settings and data; (None, why not) otherwise."""
    import hashlib

    from ..checkpoint import resolve_checkpoint
    from ..data import read_corpus
    from ..io import load_json
    base = _base_dir(out)
    if not os.path.exists(base):
        return None, "no base yet"
    try:
        folder = resolve_checkpoint(base)
        cfg = load_json(os.path.join(folder, "config.json"))
        state = load_json(os.path.join(folder, "trainer_state.json"))
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"
    text, tok = read_corpus(s.base_data)
    want_model = dict(vocab_size=tok.vocab_size, block_size=s.block_size, n_layer=s.n_layer,
                      n_head=s.n_head, n_embd=s.n_embd, dropout=0.0, bias=True)
    want_train = asdict(s.base_train_config(progress=False))
    got_train = dict(cfg.get("train") or {})
    got_train.pop("progress", None)
    want_train.pop("progress")
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()   # as load_data
    if (cfg.get("model") or {}).get("config") != want_model:
        return None, "a different model configuration"
    if got_train != want_train:
        return None, "different pretraining settings or seed"
    if (cfg.get("data") or {}).get("sha256") != sha:
        return None, "different base data"
    if state.get("step") != s.pretrain_iters:
        return None, "an unfinished run"
    return folder, None


def phase_pretrain(s: DemoSettings, out, progress: bool = True) -> dict:
    from .. import backend
    from ..data import load_data
    from .finetune import TimedTrainer
    from ..models.gpt import GPT, GPTConfig
    data = load_data(s.base_data, block_size=s.block_size)
    backend.manual_seed(s.seed)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=s.block_size,
                          n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd))
    trainer = TimedTrainer(model, data, s.base_train_config(progress), _base_dir(out))
    res = trainer.train()
    return {"phase": "pretrain", "data": s.base_data, "params": model.num_parameters(),
            "steps": res.step, "val_before": res.evals[0]["val_loss"],
            "val_after": res.evals[-1]["val_loss"], "seconds": round(res.elapsed_s, 2),
            **trainer.step_times(res),
            "curve": [(e["step"], e["val_loss"]) for e in res.evals], "checkpoint": res.checkpoint}


def _sample(model, tok, s: DemoSettings) -> str:
    from ..backend import np
    ids = tok.encode(s.prompt)[None]
    out = model.generate(ids, s.sample_tokens, temperature=s.temperature,
                         rng=np.random.default_rng(s.seed))
    return tok.decode(out[0])


def phase_finetune(s: DemoSettings, out, method: str, progress: bool = True) -> dict:
    from ..data import load_data
    from .finetune import finetune, load_base, prepare, save_finetuned
    t0 = time.perf_counter()
    model, tok, _ = load_base(_base_dir(out))
    data = load_data(s.target_data, tokenizer=tok, block_size=s.block_size)
    info = prepare(model, method, s.lora_config())
    res = finetune(model, data, s.finetune_train_config(method, progress))
    dest = os.path.join(os.fspath(out), _SAVED[method])
    weights = save_finetuned(model, tok, method, dest, base=_base_dir(out),
                             extra={"data": s.target_data, "steps": res["steps"],
                                    "val_loss": res["val_after"]})
    sample = _sample(model, tok, s)
    res.pop("evals")
    return {"phase": method, **info, **res, "saved": os.path.relpath(dest, out),
            "saved_file": os.path.relpath(weights, out), "saved_bytes": os.path.getsize(weights),
            "sample": sample, "seconds": round(time.perf_counter() - t0, 2)}


def phase_base_sample(s: DemoSettings, out) -> dict:
    from .finetune import load_base
    model, tok, _ = load_base(_base_dir(out))
    return {"sample": _sample(model, tok, s)}


def _blas_threads(threads: int | None):
    """A context fixing BLAS threads (None or 0: the Trainer's own rule, the cores free now,
    see blas.FreeCores). The demo's matrices are small (at most 512 wide): on 2 cores one
    thread is as fast, and a fixed count keeps its timings from following the machine's load."""
    from ..blas import limit_threads
    return limit_threads(threads)


def _phase(name: str, s: DemoSettings, out, progress: bool, threads: int | None) -> dict:
    with _blas_threads(threads):
        if name == "pretrain":
            return phase_pretrain(s, out, progress)
        return phase_finetune(s, out, name, progress)


def _run_phase(name: str, s: DemoSettings, out, isolate: bool, progress: bool,
               threads: int | None, debug: bool = False) -> dict:
    """Run one phase here or in a child process; adds its peak RSS when isolated."""
    if not isolate:
        res = _phase(name, s, out, progress, threads)
        res["peak_rss_mb"] = None
        return res
    cmd = [sys.executable, "-m", "tinylora.apps.demo", "--phase", name, "--out", os.fspath(out),
           "--settings", json.dumps(asdict(s)), "--threads", str(threads or 0)]
    cmd += ([] if progress else ["--no-progress"]) + (["--debug"] if debug else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)   # stderr (bars) passes through
    lines = proc.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1])
    except (IndexError, ValueError):
        res = {"error": f"exit status {proc.returncode}, no result"}
    if proc.returncode != 0 or "error" in res:
        raise RuntimeError(f"demo phase {name!r} failed: {res.get('error')}")
    return res


def _child(argv=None) -> None:
    import argparse

    from .bench import peak_rss_mb
    ap = argparse.ArgumentParser(prog="python -m tinylora.apps.demo",
                                 description="one phase of `tinylora demo` (prints JSON)")
    ap.add_argument("--phase", required=True, choices=("pretrain",) + METHODS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", default="{}", help="DemoSettings fields as JSON")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (0: auto, the cores free now)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--debug", action="store_true", help="a traceback on errors")
    a = ap.parse_args(argv)
    from .. import backend
    backend.tune_malloc()   # before anything is allocated, so the phase's peak RSS is its own
    try:
        s = DemoSettings(**json.loads(a.settings))
        res = _phase(a.phase, s, a.out, not a.no_progress, a.threads)
    except Exception as e:  # noqa: BLE001  (the parent reports it as one line)
        if a.debug:
            import traceback
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(json.dumps({"error": msg}))
        sys.exit(1)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(res))


# ----------------------------------------------------------------------------- the demo

def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    import resource
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _machine() -> dict:
    from .bench import _blas_info
    from ..backend import np
    return {"platform": platform.platform(), "processor": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": _blas_info(None).get("libraries")}


def run_demo(out="tinylora-demo", *, quick: bool = False, settings: DemoSettings | None = None,
             seed: int | None = None, isolate: bool = True, progress: bool = True,
             fresh: bool = False, threads: int | None = 1, debug: bool = False,
             log=_log) -> dict:
    """Run the whole demo into ``out``; returns the results (also written to metrics.json).

    quick: the small settings (QUICK). settings: explicit settings instead. seed: overrides
    the settings' seed. isolate: each training phase in its own process, so that each has
    its own peak-memory figure. fresh: pretrain again even when a matching base is cached.
    threads: BLAS threads per phase (None or 0: auto, the cores free now). debug: a failing
    child process prints its traceback.
    """
    from .. import viz
    from ..io import save_json
    s = settings or (QUICK if quick else SETTINGS)
    if seed is not None:
        s = replace(s, seed=seed)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    results = {"settings": asdict(s), "quick": quick, "out": os.path.abspath(out),
               "machine": _machine(), "isolated": isolate, "blas_threads": threads or None}

    folder, why = (None, "--fresh") if fresh else _cached_base(s, out)
    if folder is not None:
        log(f"[1/4] reusing the base model in {_base_dir(out)} (same settings, seed and data); "
            "pass --fresh to pretrain again")
        from ..io import load_json
        state = load_json(os.path.join(folder, "trainer_state.json"))
        evals = state.get("evals") or []
        results["base"] = {"phase": "pretrain", "cached": True, "data": s.base_data,
                           "steps": state.get("step"),
                           "val_before": evals[0]["val_loss"] if evals else None,
                           "val_after": evals[-1]["val_loss"] if evals else None,
                           "curve": [(e["step"], e["val_loss"]) for e in evals],
                           "checkpoint": folder}
    else:
        if os.path.exists(_base_dir(out)):
            if not os.path.isfile(os.path.join(_base_dir(out), "latest.json")):
                raise FileExistsError(f"{_base_dir(out)} exists and is not a demo base run; "
                                      "move it away or choose another --out")
            shutil.rmtree(_base_dir(out))
        log(f"[1/4] pretraining a {s.n_layer}-layer GPT on {s.base_data} for "
            f"{s.pretrain_iters} steps ({why})")
        results["base"] = {**_run_phase("pretrain", s, out, isolate, progress, threads, debug), "cached": False}
    results["base"]["sample"] = phase_base_sample(s, out)["sample"]

    results["methods"] = {}
    for i, method in enumerate(METHODS, start=2):
        log(f"[{i}/4] fine-tuning on {s.target_data}: {method} ({s.finetune_iters} steps)")
        results["methods"][method] = _run_phase(method, s, out, isolate, progress, threads, debug)

    curves = {m: r["curve"] for m, r in results["methods"].items()}
    png = viz.plot_loss_curves(curves, os.path.join(out, "loss_curves.png"),
                               title=f"validation loss on {s.target_data} while fine-tuning")
    graph = viz.draw_lora_layer(os.path.join(out, "lora_layer_graph"))
    results["files"] = {"loss_curves": None if png is None else os.path.relpath(png, out),
                        "graph": [os.path.relpath(p, out) for p in graph],
                        "metrics": "metrics.json", "base": os.path.relpath(_base_dir(out), out),
                        **{m: r["saved"] for m, r in results["methods"].items()}}
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 1)
    save_json(os.path.join(out, "metrics.json"), results)
    return results


# ----------------------------------------------------------------------------- report

def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def report_rows(results: dict) -> list:
    """The table as a list of dicts (column -> text)."""
    rows = []
    for method, r in results["methods"].items():
        rows.append({
            "method": method,
            "trainable": f"{r['trainable']:,}",
            "trainable %": f"{r['trainable_pct']:.2f}",
            "val loss before": f"{r['val_before']:.3f}",
            "val loss after": f"{r['val_after']:.3f}",
            "ms/step": f"{r['ms_per_step']:.0f}",
            "CPU ms/step": f"{r['cpu_ms_per_step']:.0f}",
            "peak RSS": "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f} MiB",
            "train state": _mib(r["state_bytes"]),
            "saved": r["saved_file"],
            "size": _mib(r["saved_bytes"]),
        })
    return rows


def format_report(results: dict) -> str:
    from .report import table
    s, b = results["settings"], results["base"]
    lines = []
    how = f"{b['steps']} steps, reused from {results['out']}/base/" if b.get("cached") else \
        f"{b['steps']} steps, {b['ms_per_step']:.0f} ms/step"
    lines.append(f"base: {s['n_layer']}-layer GPT (n_embd {s['n_embd']}, context "
                 f"{s['block_size']}) pretrained on {s['base_data']} ({how}); val loss "
                 f"{b['val_before']:.3f} -> {b['val_after']:.3f}")
    lines.append(f"fine-tuned on {s['target_data']}: {s['finetune_iters']} steps of "
                 f"{s['batch_size']}x{s['block_size']} characters each; LoRA r={s['lora_r']}, "
                 f"alpha={s['lora_alpha']} on {s['target_modules']}; lr full {s['full_lr']:g}, "
                 f"LoRA/QLoRA {s['lora_lr']:g}")
    lines.append("")
    lines.append(table(report_rows(results)))
    lines.append("")
    lines.append("val loss: mean cross-entropy (nats/character) on the same held-out "
                 f"{s['target_data']} windows; 'before' for QLoRA is the 4-bit base.")
    lines.append("ms/step: wall time per training step, evaluations left out; CPU ms/step: the "
                 "process's CPU time per step (one BLAS thread: the wall time on an idle core).")
    lines.append("peak RSS: high-water mark of the phase's own process (interpreter and data "
                 "included); train state: weights + gradients + AdamW moments, counted.")
    q = results["methods"].get("qlora", {}).get("quantized")
    if q:
        lines.append(q)
    lines.append("")
    lines.append(f"samples (prompt {s['prompt']!r}, temperature {s['temperature']}, seed {s['seed']}):")
    samples = [("base", b["sample"])] + [(m, r["sample"]) for m, r in results["methods"].items()]
    for name, text in samples:
        lines.append(f"--- {name} " + "-" * max(0, 60 - len(name)))
        lines.append(text.rstrip())
    lines.append("-" * 65)
    files = results["files"]
    lines.append(f"output: {results['out']}/")
    lines.append(f"  {files.get('base', 'base')}/ (the pretrained base run; reused by the next "
                 "demo with the same settings and seed)")
    lines.append(f"  {files['lora']}/ and {files['qlora']}/ (PEFT layout), {files['full']}/ "
                 "(checkpoint: tinylora generate --checkpoint), metrics.json")
    graph = list(files["graph"])
    if not any(g.endswith(".svg") for g in graph):
        graph.append("no .svg (Graphviz's `dot` is not installed; the .dot file renders anywhere)")
    lines.append("  " + (files["loss_curves"] or "no loss_curves.png (matplotlib not installed)")
                 + ", " + ", ".join(graph))
    lines.append(f"total {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU")
    return "\n".join(lines)


if __name__ == "__main__":
    _child()
