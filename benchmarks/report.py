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

from benchmarks.registry import IMPLEMENTATIONS

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


def interleaved(data: dict) -> dict[int, dict[str, float]]:
    """``{size: {"x/y": median of per-round ratios}}`` from test_interleaved."""
    out = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "ratios" in info:
            out[info["size"]] = info["ratios"]
    return out


def extras(data: dict) -> dict[str, dict]:
    """``{test name: extra_info + median}`` for the fleet-level measures."""
    out = {}
    for b in data["benchmarks"]:
        if not {"impl", "ratios"} & set(b.get("extra_info", {})):
            out[b["name"]] = {**b["extra_info"], "median": b["stats"]["median"]}
    return out


def _ratio(times, num: str, den: str, size: int, turns=None) -> float | None:
    """``num``'s time over ``den``'s: from the interleaved rounds when measured, else medians."""
    if turns and f"{num}/{den}" in turns.get(size, {}):
        return turns[size][f"{num}/{den}"]
    a, b = times.get(num, {}).get(size), times.get(den, {}).get(size)
    return None if a is None or b is None else a / b


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
    lines = ["### Time per pick (median)", "", head, rule]
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


def goals(times, extra, turns) -> list[tuple[str, str, str, bool | None]]:
    """``(goal, wanted, measured, met)`` for every DESIGN section 7 goal.

    Ratios come from the interleaved rounds where those were measured (``turns``).
    """
    rows = []
    r = _ratio(times, "engine-kernel", "memory-limit", 1_000_000, turns)
    e2e = _ratio(times, "engine", "memory-limit", 1_000_000)
    rows.append(("pick over 1,000,000 agents, one thread, vs memory limit", "≤ 1.5x",
                 f"{_fmt_x(r)} (end to end, default threads: {_fmt_x(e2e)})",
                 None if r is None else r <= 1.5))  # fmt: skip
    t = times.get("engine", {}).get(100)
    rows.append(("pick over 100 agents, end to end", "≤ 5 µs", _fmt_time(t),
                 None if t is None else t <= 5e-6))  # fmt: skip
    r = _ratio(times, "reference", "engine", 100_000)
    rows.append(("vs plain-Python reference at 100,000", "≥ 100x", _fmt_x(r),
                 None if r is None else r >= 100))  # fmt: skip
    r = _ratio(times, "numpy", "engine", 1_000_000, turns)
    rk = _ratio(times, "numpy", "engine-kernel", 1_000_000, turns)
    rows.append(("vs numpy at 1,000,000", "≥ 5x", f"{_fmt_x(r)} (serial kernel: {_fmt_x(rk)})",
                 None if r is None else r >= 5))  # fmt: skip
    for peer in ("polars", "duckdb"):
        ratios = {n: _ratio(times, peer, "engine", n, turns) for n in times.get(peer, {})}
        ratios = {n: v for n, v in ratios.items() if v is not None}
        worst = min(ratios.items(), key=lambda kv: kv[1]) if ratios else None
        measured = "–" if worst is None else f"min {_fmt_x(worst[1])} (at {worst[0]:,})"
        rows.append((f"vs {peer} at every size", "≥ 10x", measured,
                     None if worst is None else worst[1] >= 10))  # fmt: skip
    batches = {k: v for k, v in extra.items() if k.startswith("test_heartbeat_many")}
    rates = {v["updates_per_call"]: v["updates_per_call"] / v["median"] for v in batches.values()}
    if rates:
        measured = ", ".join(f"{r / 1e6:,.1f} M/s (batch {b:,})" for b, r in sorted(rates.items()))
        rows.append(("heartbeat updates through heartbeat_many", "≥ 1 M/s", measured,
                     min(rates.values()) >= 1e6))  # fmt: skip
    mem = extra.get("test_bytes_per_agent")
    if mem:
        b = mem["bytes_per_agent"]
        rows.append(("bytes per agent in the fleet columns", "≤ 64", f"{b:.1f}", b <= 64))
    cold = extra.get("test_cold_start")
    if cold:
        s = cold["cache_import_and_pick_s"]
        measured = f"{s:.2f} s (without cache: {cold['no_cache_import_and_pick_s']:.2f} s)"
        rows.append(("cold start: import + first pick, compiled cache", "≤ 1 s", measured, s <= 1))
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
    sizes = sorted(turns)
    keys = list(dict.fromkeys(k for n in sizes for k in turns[n]))
    lines = ["### Ratios measured in turns (median over rounds of each round's ratio)", "",
             "Each round times every implementation once, in turn, so both sides of a ratio",
             "see the same load. Above 1: the second one is faster.", "",
             "| time ratio | " + " | ".join(f"{n:,}" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]  # fmt: skip
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt_x(turns[n].get(key)) for n in sizes) + " |")
    return lines


def markdown(data: dict) -> str:
    times, extra, turns = pick_times(data), extras(data), interleaved(data)
    lines = ["## Benchmark report", "", f"Machine: {machine(data)}.", "",
             "### DESIGN section 7 goals", "", "| goal | wanted | measured | met |",
             "|---|---|---|---|"]  # fmt: skip
    for goal, wanted, measured, met in goals(times, extra, turns):
        mark = "not measured" if met is None else "yes" if met else "**no**"
        lines.append(f"| {goal} | {wanted} | {measured} | {mark} |")
    lines += ["", *interleaved_table(turns), "", *ladder_tables(times), "", "### Other measures",
              "", *other_measures(extra)]  # fmt: skip
    return "\n".join(lines) + "\n"


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
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    data = load(args.json)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(data)
    (args.out / "report.md").write_text(text)
    plot(pick_times(data), args.out / "pick_time.png")
    print(text)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'pick_time.png'}")


if __name__ == "__main__":
    main()
