"""Turn a pytest-benchmark JSON into the benchmark report: ratios per size, the DESIGN section 7
goals met or not, and a log-log plot of time per pick against fleet size.

    python -m benchmarks.report out/bench/benchmark.json --out out/bench

Writes ``DIR/report.md`` (also printed) and ``DIR/pick_time.png``. Times are medians per pick
(a benchmark call makes ``picks_per_call`` picks); ratios are of medians measured in one run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.registry import IMPLEMENTATIONS, MIXES

PEERS = ("reference", "numpy", "polars", "duckdb")


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def pick_times(data: dict) -> dict[str, dict[int, float]]:
    """``{impl: {size: median seconds per pick}}`` from the pick ladder."""
    times: dict[str, dict[int, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "impl" in info and b["stats"]:
            times[info["impl"]][info["size"]] = b["stats"]["median"] / info["picks_per_call"]
    return times


def interleaved(data: dict) -> dict[str, dict[int, dict]]:
    """``{mix: {size: extra_info}}`` from test_interleaved (``ratios``: median per-round ratios)."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "ratios" in info:
            out[info.get("mix", "mixed")][info["size"]] = info
    return out


def ladder_loads(data: dict) -> dict[int, float]:
    """``{size: highest load average while the ladder timed that size}``."""
    out: dict[int, float] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "impl" in info and "load_avg" in info:
            out[info["size"]] = max(out.get(info["size"], 0.0), info["load_avg"])
    return out


def extras(data: dict) -> dict[str, dict]:
    """``{test name: extra_info + median}`` for the fleet-level measures."""
    out = {}
    for b in data["benchmarks"]:
        if not {"impl", "ratios"} & set(b.get("extra_info", {})):
            out[b["name"]] = {**b["extra_info"], "median": b["stats"]["median"]}
    return out


def _ratio(times, num: str, den: str, size: int) -> float | None:
    """``num``'s median time over ``den``'s, from the separately timed ladder."""
    a, b = times.get(num, {}).get(size), times.get(den, {}).get(size)
    return None if a is None or b is None else a / b


def _turn(turns, mix: str, key: str, size: int) -> tuple[float | None, float | None]:
    """A ratio measured in turns, and the load average when it was measured."""
    info = turns.get(mix, {}).get(size)
    if info is None:
        return None, None
    return info["ratios"].get(key), info.get("load_avg")


def _worst(turns, mixes, key: str, low: bool = True) -> tuple[float | None, str, float | None]:
    """The lowest (or highest) ratio ``key`` over ``mixes`` and every size: (ratio, where, load)."""
    found = [(info["ratios"][key], f"{mix}, {n:,}", info.get("load_avg"))
             for mix in mixes for n, info in turns.get(mix, {}).items()
             if key in info["ratios"]]  # fmt: skip
    if not found:
        return None, "", None
    return (min if low else max)(found, key=lambda f: f[0])


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e6:,.1f} µs" if s < 1e-3 else f"{s * 1e3:,.2f} ms"


def _fmt_x(r: float | None) -> str:
    return "–" if r is None else f"{r:,.1f}x" if r >= 10 else f"{r:.2f}x"


def ladder_tables(times) -> list[str]:
    sizes = sorted({n for t in times.values() for n in t})
    impls = [i for i in IMPLEMENTATIONS if i in times]
    head = "| implementation | " + " | ".join(f"{n:,}" for n in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    lines = ["### Time per pick, each implementation timed on its own (mixed requests, median)",
             "", "Separate timings, seconds apart: the ratios below wander with the load;",
             "the goals use the ratios measured in turns above.", "", head, rule]  # fmt: skip
    for impl in impls:
        cells = " | ".join(_fmt_time(times[impl].get(n)) for n in sizes)
        lines.append(f"| {impl} | {cells} |")
    lines += ["", "### Engine against peers (times faster; higher is better)", "",
              "| ratio | " + " | ".join(f"{n:,}" for n in sizes) + " |", rule]  # fmt: skip
    rows = [(f"{peer} / engine", peer, "engine") for peer in PEERS if peer in times]
    rows += [(f"{peer} / engine-kernel", peer, "engine-kernel") for peer in ("numpy",)]
    for label, num, den in rows:
        cells = " | ".join(_fmt_x(_ratio(times, num, den, n)) for n in sizes)
        lines.append(f"| {label} | {cells} |")
    lines += ["", "### Against the memory limit and between kernels (lower is better)", "",
              "| ratio | " + " | ".join(f"{n:,}" for n in sizes) + " |", rule]  # fmt: skip
    rows = [("engine-kernel / memory-limit (≤ 1.5 wanted)", "engine-kernel", "memory-limit"),
            ("engine / memory-limit", "engine", "memory-limit"),
            ("engine-parallel / engine-kernel", "engine-parallel", "engine-kernel"),
            ]  # fmt: skip
    for label, num, den in rows:
        cells = " | ".join(_fmt_x(_ratio(times, num, den, n)) for n in sizes)
        lines.append(f"| {label} | {cells} |")
    return lines


Goal = tuple[str, str, str, bool | None, float | None]


def goals(times, extra, turns) -> list[Goal]:
    """``(goal, wanted, measured, met, load average)`` for every DESIGN section 7 goal and the
    churn goal of issue 9. Ratios of picks are those measured in turns."""
    rows: list[Goal] = []
    big = 1_000_000
    for mix, label in (("team", "teams drawn uniformly"), ("team-busy", "teams drawn by size")):
        r, load = _turn(turns, mix, "numpy/engine", big)
        pool = turns.get(mix, {}).get(big, {}).get("pool_mean")
        where = "" if pool is None else f" (pool {pool:,.0f} agents on average)"
        rows.append((f"team-pool pick, 1,000,000 agents in 10,000 teams, {label}, vs numpy",
                     "≥ 100x", _fmt_x(r) + where, None if r is None else r >= 100,
                     load))  # fmt: skip
    r, load = _turn(turns, "community", "engine-kernel/memory-limit", big)
    e2e, _ = _turn(turns, "community", "engine/memory-limit", big)
    rows.append(("community pick, 1,000,000 agents (30% opted in), serial kernel vs memory limit",
                 "≤ 1.5x", f"{_fmt_x(r)} (pick_agent end to end: {_fmt_x(e2e)})",
                 None if r is None else r <= 1.5, load))  # fmt: skip
    small = extra.get("test_small_pick")
    if small:
        t = small["best_s"]
        rows.append(("pick over 100 agents, end to end (timeit best; median)", "≤ 2.5 µs",
                     f"{_fmt_time(t)}; {_fmt_time(small['median_s'])}", t <= 2.5e-6,
                     small.get("load_avg")))  # fmt: skip
    r = _ratio(times, "reference", "engine", 100_000)
    load = extra.get("_ladder_load", {}).get(100_000)
    rows.append(("vs plain-Python reference at 100,000", "≥ 100x", _fmt_x(r),
                 None if r is None else r >= 100, load))  # fmt: skip
    for peer, wanted in (("numpy", 5), ("polars", 10), ("duckdb", 10)):
        r, where, load = _worst(turns, MIXES, f"{peer}/engine")
        measured = "–" if r is None else f"min {_fmt_x(r)} ({where})"
        rows.append((f"vs {peer} at every size, team and community requests", f"≥ {wanted}x",
                     measured, None if r is None else r >= wanted, load))  # fmt: skip
    a = extra.get("test_assign")
    if a:
        rows.append((f"assign(): {a['requests']:,} queued requests onto {a['agents']:,} agents",
                     "≥ 200,000 placements/s",
                     f"{a['placements_per_s']:,.0f} placements/s ({a['placed']:,} placed; "
                     f"{a['requests_per_s']:,.0f} requests/s)",
                     a["placements_per_s"] >= 2e5, a.get("load_avg")))  # fmt: skip
        r = a["dispatch_loop_over_assign"]
        rows.append(("assign() vs a loop of Fleet.dispatch", "≥ 10x", _fmt_x(r), r >= 10,
                     a.get("load_avg")))  # fmt: skip
    batches = {k: v for k, v in extra.items() if k.startswith("test_heartbeat_many")}
    rates = {v["updates_per_call"]: v["updates_per_call"] / v["median"] for v in batches.values()}
    if rates:
        measured = ", ".join(f"{r / 1e6:,.1f} M/s (batch {b:,})" for b, r in sorted(rates.items()))
        load = max((v.get("load_avg", 0.0) for v in batches.values()), default=None)
        rows.append(("heartbeat updates through heartbeat_many", "≥ 1 M/s", measured,
                     min(rates.values()) >= 1e6, load or None))  # fmt: skip
    per_size = {n: info["bytes_per_agent"] for mix in turns.values() for n, info in mix.items()
                if "bytes_per_agent" in info}  # fmt: skip
    mem = extra.get("test_bytes_per_agent")
    if mem:
        per_size.setdefault(mem["fleet"], mem["bytes_per_agent"])
    if per_size:
        n, b = max(per_size.items(), key=lambda kv: kv[1])
        rows.append(("bytes per agent, columns and indexes (worst size)", "≤ 64",
                     f"{b:.1f} (at {n:,})", b <= 64, None))  # fmt: skip
    cold = extra.get("test_cold_start")
    if cold:
        s = cold["cache_import_and_pick_s"]
        measured = f"{s:.2f} s (without cache: {cold['no_cache_import_and_pick_s']:.2f} s)"
        rows.append(("cold start: import + first pick, compiled cache", "≤ 1 s", measured, s <= 1,
                     cold.get("load_avg")))  # fmt: skip
    churn = extra.get("test_churn")
    if churn:
        r = churn["pick_ratio"]
        rows.append((f"issue 9: pick time after churn ({churn['agents']:,} agents, "
                     f"{churn['operations']:,} updates), churned / fresh fleet",
                     "≈ 1x (≤ 1.1x)", _fmt_x(r), r <= 1.1, churn.get("load_avg")))  # fmt: skip
        r = churn["nbytes_ratio"]
        b, h, f = churn["before"], churn.get("half", {}), churn["after"]
        rows.append(("issue 9: Fleet.nbytes after churn / before", "back to start (≤ 1.0x)",
                     f"{r:.3f}x ({b['nbytes']:,} → {h.get('nbytes', 0):,} after half the "
                     f"churn → {f['nbytes']:,} bytes; live bytes {b.get('live_nbytes', 0):,} → "
                     f"{f.get('live_nbytes', 0):,}; peak {churn['peak_nbytes']:,})", r <= 1.0,
                     churn.get("load_avg")))  # fmt: skip
    return rows


def other_measures(extra) -> list[str]:
    lines = []
    single = extra.get("test_heartbeat_single")
    if single:
        rate = single["updates_per_call"] / single["median"]
        lines.append(f"- single `heartbeat()` calls: {rate / 1e6:,.2f} M/s")
    for threads in (1, 2):
        d = extra.get(f"test_dispatch_threads[{threads}]")
        if d:
            rate = d["dispatches_per_call"] / d["median"]
            lines.append(f"- `Fleet.dispatch()` + `release()` with {threads} thread(s), "
                         f"{d['fleet']:,} agents: {rate:,.0f} dispatches/s")  # fmt: skip
    a = extra.get("test_assign")
    if a:
        sec = a["seconds"]
        lines.append(f"- `assign()` of {a['requests']:,} requests onto {a['agents']:,} agents: "
                     f"{_fmt_time(sec['assign'])} (a `Fleet.dispatch` loop: "
                     f"{_fmt_time(sec['dispatch'])}); with `locality_wait_s=30` (delay "
                     f"scheduling, every request young): {_fmt_time(sec['assign-wait'])}, "
                     f"{a['placed_waiting']:,} placed")  # fmt: skip
    c = extra.get("test_churn")
    if c:
        b, f = c["before"], c["after"]
        lines.append(f"- churn: {c['hostile']:,} hostile agents (64 fresh labels, 256 fresh "
                     f"models each) upserted and removed, {c['reconnects']:,} reconnects with a "
                     f"team change and an opt-in flip each, {c['operations']:,} updates in "
                     f"{c['churn_s']:.1f} s; bitset words (labels, models) {b['label_words']}, "
                     f"{b['model_words']} before, {f['label_words']}, {f['model_words']} after; "
                     f"pick {_fmt_time(c['fresh_pick_s'])} fresh, "
                     f"{_fmt_time(c['churned_pick_s'])} churned")  # fmt: skip
    for name, p in sorted(extra.items()):
        if name.startswith("test_parallel_speedup"):
            lines.append(
                f"- parallel kernel at {p['size']:,} agents, {p['threads']} threads "
                f"({p['threading_layer']}): serial {_fmt_time(p['serial_s'])}, parallel "
                f"{_fmt_time(p['parallel_s'])}: speed-up {p['speedup']:.2f}x"
            )
    return lines


def machine(data: dict) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    return (f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, "
            f"Python {m.get('python_version', '?')}, {m.get('system', '')} {m.get('release', '')}; "
            f"run {data.get('datetime', '?')[:19]}")  # fmt: skip


def interleaved_table(turns) -> list[str]:
    if not turns:
        return []
    lines = ["### Ratios measured in turns (median over rounds of each round's ratio)", "",
             "Each round times every implementation once, in turn, on the same requests, so both",
             "sides of a ratio see the same load. `x/engine` above 1: the engine is faster.",
             "Pool: mean `Decision.considered` of the timed requests; load: the 1-minute load",
             "average when measured (2 cores: above 2, other processes shared them)."]  # fmt: skip
    for mix in (*MIXES, "mixed"):
        if mix not in turns:
            continue
        per = turns[mix]
        sizes = sorted(per)
        keys = list(dict.fromkeys(k for n in sizes for k in per[n]["ratios"]))
        lines += ["", f"#### {mix} requests", "",
                  "| | " + " | ".join(f"{n:,}" for n in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]  # fmt: skip
        for key in keys:
            cells = " | ".join(_fmt_x(per[n]["ratios"].get(key)) for n in sizes)
            lines.append(f"| {key} | {cells} |")
        lines.append(
            "| engine, median per pick | "
            + " | ".join(_fmt_time(per[n]["median_s"]["engine"]) for n in sizes)
            + " |"
        )
        lines.append(
            "| pool (mean agents) | "
            + " | ".join(f"{per[n].get('pool_mean', 0):,.0f}" for n in sizes)
            + " |"
        )
        lines.append(
            "| load average | "
            + " | ".join(f"{per[n].get('load_avg', 0):.1f}" for n in sizes)
            + " |"
        )
    return lines


def small_pick(extra) -> list[str]:
    small = extra.get("test_small_pick")
    if not small:
        return []
    lines = [f"### Where a pick over {small['size']} agents spends its time", "",
             f"`pick_agent` end to end: best {_fmt_time(small['best_s'])}, median "
             f"{_fmt_time(small['median_s'])} per pick ({small['picks']} requests, timeit "
             f"repeats; load average {small.get('load_avg', 0):.1f}). Each step alone:", "",
             "| step | best | median |", "|---|---:|---:|"]  # fmt: skip
    for name, t in small["steps"].items():
        lines.append(f"| {name} | {_fmt_time(t)} | {_fmt_time(small['steps_median'][name])} |")
    lines += ["", "cProfile of the same picks (by own time):", "", "```",
              small["profile"], "```"]  # fmt: skip
    return lines


def markdown(data: dict) -> str:
    times, extra, turns = pick_times(data), extras(data), interleaved(data)
    extra["_ladder_load"] = ladder_loads(data)
    lines = ["## Benchmark report", "", f"Machine: {machine(data)}.", "",
             "### Goals (DESIGN section 7, issue 9)", "",
             "| goal | wanted | measured | met | load |", "|---|---|---|---|---:|"]  # fmt: skip
    for goal, wanted, measured, met, load in goals(times, extra, turns):
        mark = "not measured" if met is None else "yes" if met else "**no**"
        shown = "–" if load is None else f"{load:.1f}"
        lines.append(f"| {goal} | {wanted} | {measured} | {mark} | {shown} |")
    lines += ["", *interleaved_table(turns), "", *small_pick(extra), "", *ladder_tables(times),
              "", "### Other measures", "", *other_measures(extra)]  # fmt: skip
    return "\n".join(lines) + "\n"


def print_goals(data: dict) -> None:
    """Every goal, met or missed, one per line (the report's summary)."""
    times, extra, turns = pick_times(data), extras(data), interleaved(data)
    extra["_ladder_load"] = ladder_loads(data)
    for goal, wanted, measured, met, load in goals(times, extra, turns):
        mark = "NOT MEASURED" if met is None else "MET   " if met else "MISSED"
        under = "" if load is None or load < 3 else f"  [measured under load {load:.1f}]"
        print(f"{mark}  {goal}: wanted {wanted}, measured {measured}{under}")


def plot(times, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for impl in IMPLEMENTATIONS:
        if impl in times:
            sizes = sorted(times[impl])
            style = "--" if IMPLEMENTATIONS[impl].kind == "limit" else "-"
            ax.plot(sizes, [times[impl][n] for n in sizes], style, marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents in the fleet")
    ax.set_ylabel("time per pick (s, median)")
    ax.set_title("Time per pick against fleet size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark report from pytest-benchmark JSON")
    parser.add_argument("json", type=Path, nargs="+", help="one or more runs (merged)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    data = load(args.json[0])
    # Later runs add to the first (the largest rung, run apart at a quiet moment) and replace
    # its measures of the same name (a benchmark run again).
    merged = {b["fullname"]: b for path in args.json for b in load(path)["benchmarks"]}
    data["benchmarks"] = list(merged.values())
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(data)
    (args.out / "report.md").write_text(text)
    plot(pick_times(data), args.out / "pick_time.png")
    print(text)
    print_goals(data)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'pick_time.png'}")


if __name__ == "__main__":
    main()
