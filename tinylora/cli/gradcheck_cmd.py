"""Run the float64 gradient check of every op over several shapes (broadcasting, repeated and
negative indices, masks) and print op, shapes, max relative error and pass. Exits 1 if any case
fails.
"""
from __future__ import annotations

import time

from .common import add_command, add_json, add_seed, print_json, table


def register(sub, name, summary):
    p = add_command(sub, name, summary, __doc__)
    add_seed(p)
    add_json(p)
    p.add_argument("--op", action="append", default=None,
                   help="only check ops with this name (repeatable; default: every op)")
    p.add_argument("--tol", type=float, default=1e-6,
                   help="a case passes when its relative error is at most this (and allclose holds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..opcheck import all_cases, run_case

    cases = [c for c in all_cases() if not args.op or c.op in args.op or c.name in args.op]
    if not cases:
        raise ValueError(f"no op named {args.op}; see `tinylora gradcheck` for the list")
    rows, t0 = [], time.perf_counter()
    for case in cases:
        report = run_case(case, args.seed)
        ok = report.ok and report.max_rel_err <= args.tol
        rows.append({"op": case.op, "shapes": case.label,
                     "max_rel_err": float(report.max_rel_err), "pass": "yes" if ok else "NO"})
    failed = [r for r in rows if r["pass"] != "yes"]
    n_ops = len({c.name for c in cases})
    if args.json:
        print_json({"cases": rows, "ops": n_ops, "failed": len(failed), "tolerance": args.tol,
                    "seconds": round(time.perf_counter() - t0, 2)})
    else:
        print(table(rows, ["op", "shapes", "max_rel_err", "pass"]))
        print(f"\n{len(rows) - len(failed)}/{len(rows)} cases of {n_ops} ops pass "
              f"(relative error <= {args.tol:g}, "
              f"float64, {time.perf_counter() - t0:.1f}s)")
    return 1 if failed else 0
