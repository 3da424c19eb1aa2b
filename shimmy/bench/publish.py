"""``shimmy bench --report DIR``: the published form of one run.

Writes ``DIR/results.json`` (everything measured), ``DIR/report.md`` (machine, exact command,
one table per figure with the median, the spread over repetitions, wall and CPU time per
message, and shimmy's ratio to every peer) and one PNG per figure (matplotlib, Agg backend).

Every figure is the median over the run's repetitions; the whiskers/spread are the smallest
and largest repetition.  A ratio is "how many times better shimmy is" in the figure's sense:
peer / shimmy for latencies (lower is better), shimmy / peer for rates (higher is better), so
> 1 always means shimmy won.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import harness, report

# The shimmy row each figure's ratios are taken against (the default way to use shimmy).
SHIMMY_ROW = {"latency": ("shimmy", "default"), "throughput": ("shimmy", "copy"),
              "fanout": ("shimmy", None), "stream": ("shimmy-stream", "readinto"),
              "crossnode": ("shimmy (2 daemons)", None), "crossnode-rtt": ("shimmy (2 daemons)",
                                                                          None)}


@dataclass
class Point:
    label: str
    transport: str
    variant: str | None
    x: int
    median: float
    lo: float
    hi: float
    wall_us: float | None = None        # wall time per message (or round trip)
    cpu_us: float | None = None         # CPU per message, both sides together
    note: str = ""


@dataclass
class Figure:
    id: str
    title: str
    metric: str
    unit: str
    lower_is_better: bool
    x_name: str
    points: list[Point] = field(default_factory=list)
    note: str = ""

    def xs(self) -> list[int]:
        return sorted({p.x for p in self.points})

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.points:
            seen.setdefault(p.label, None)
        return list(seen)

    def shimmy(self, x: int) -> Point | None:
        transport, variant = SHIMMY_ROW.get(self.id.split(":")[0], (None, None))
        for p in self.points:
            if p.x == x and p.transport == transport and variant in (None, p.variant):
                return p
        return None

    def ratio(self, p: Point) -> float | None:
        s = self.shimmy(p.x)
        if s is None or not s.median or not p.median:
            return None
        return p.median / s.median if self.lower_is_better else s.median / p.median


def _spread(values: list[float]) -> tuple[float, float, float]:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    return harness.median(vals), min(vals), max(vals)


def figures(out: dict) -> list[Figure]:
    suites = out.get("suites", {})
    figs: list[Figure] = []
    pp = suites.get("pingpong", {}).get("results", [])
    if pp:
        for key, pct in (("p50_us", "p50"), ("p99_us", "p99")):
            f = Figure(f"latency:{pct}", f"Round trip {pct} by message size", f"{pct} round trip",
                       "us", True, "size")
            for r in pp:
                med, lo, hi = _spread([run[key] for run in r["runs"]])
                f.points.append(Point(r["label"], r["transport"], r["variant"], r["size"], med,
                                      lo, hi, r["wall_us_per_rt"],
                                      r["cpu_us_per_rt_client"] + r["cpu_us_per_rt_server"]))
            figs.append(f)
    tp = suites.get("throughput", {}).get("results", [])
    if tp:
        f = Figure("throughput", "One-way throughput by message size", "messages/s", "msg/s",
                   False, "size", note="UDP and iceoryx2 count what arrived (both dropped "
                   "messages here; the loss is shown); every other system delivered every "
                   "message (checked).")
        for r in tp:
            med, lo, hi = _spread([run["n"] / run["rx_elapsed_s"] for run in r["runs"]])
            loss = r.get("loss_pct") or 0.0
            f.points.append(Point(r["label"], r["transport"], r["variant"], r["size"], med, lo,
                                  hi, r["wall_us_per_msg"],
                                  r["cpu_us_per_msg_tx"] + r["cpu_us_per_msg_rx"],
                                  f"{loss:.1f}% lost" if loss else ""))
        figs.append(f)
    fo = suites.get("fanout", {}).get("results", [])
    if fo:
        f = Figure("fanout", "Fan-out, 4 KiB: slowest subscriber's rate by subscriber count",
                   "slowest subscriber msgs/s", "msg/s", False, "subscribers",
                   note="ZeroMQ and Redis PUB/SUB drop for slow subscribers; the rate counts "
                   "what was delivered; shimmy runs reliable (every message to everyone).")
        for r in fo:
            rates = [min(s["n"] / s["elapsed_s"] for s in run["subs"]) for run in r["runs"]]
            med, lo, hi = _spread(rates)
            f.points.append(Point(r["label"], r["transport"], r["variant"], r["subs"], med, lo,
                                  hi, 1e6 / r["pub_rate"] if r.get("pub_rate") else None,
                                  r["pub_cpu_us_per_msg"] + r["subs"] * r["sub_cpu_us_per_msg"],
                                  "" if r["all_delivered"] else f"{r['loss_pct']:.1f}% lost"))
        figs.append(f)
    st = suites.get("stream", {}).get("results", [])
    if st:
        f = Figure("stream", "Byte stream throughput by chunk size", "MB/s", "MB/s", False,
                   "chunk")
        for r in st:
            med, lo, hi = _spread([x["r"]["bytes"] / x["r"]["elapsed_s"] / 1e6
                                   for x in r["runs"]])
            f.points.append(Point(r["label"], r["transport"], r["variant"], r["size"], med, lo,
                                  hi, 1e6 / r["chunks_per_s"] if r.get("chunks_per_s") else None,
                                  r["cpu_us_per_chunk_writer"] + r["cpu_us_per_chunk_reader"]))
        figs.append(f)
    xn = suites.get("crossnode", {})
    if xn.get("results"):
        f = Figure("crossnode", "Cross-node one-way throughput (two daemons over 127.0.0.1)",
                   "messages/s", "msg/s", False, "size",
                   note="Medians of the repetitions; the CPU per MiB of every process and the "
                   "round trip of every run are in the tables after the figures.")
        for r in xn["results"]:
            f.points.append(Point(r["transport"], r["transport"], None, r["size"],
                                  r["msgs_per_s"], r["msgs_per_s"], r["msgs_per_s"],
                                  1e6 / r["msgs_per_s"] if r["msgs_per_s"] else None))
        figs.append(f)
    if xn.get("rtt"):
        f = Figure("crossnode-rtt", "Cross-node round trip, 64 B", "p50 round trip", "us", True,
                   "size", note="Spread shown: p50 to p99 of one run's round trips.")
        for r in xn["rtt"]:
            f.points.append(Point(r["transport"], r["transport"], None, r["size"], r["p50_us"],
                                  r["p50_us"], r["p99_us"]))
        figs.append(f)
    return figs


# -- plots --------------------------------------------------------------------------------------

def _plot(fig: Figure, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, xs = fig.labels(), fig.xs()
    width = 0.8 / max(len(labels), 1)
    plt_fig, ax = plt.subplots(figsize=(10.0, 4.4), dpi=80)
    cmap = plt.get_cmap("tab20")
    for i, label in enumerate(labels):
        pos, vals, err_lo, err_hi = [], [], [], []
        for j, x in enumerate(xs):
            p = next((p for p in fig.points if p.label == label and p.x == x), None)
            if p is None or p.median != p.median:
                continue
            pos.append(j + (i - (len(labels) - 1) / 2) * width)
            vals.append(p.median)
            err_lo.append(max(p.median - p.lo, 0))
            err_hi.append(max(p.hi - p.median, 0))
        shimmy = label.startswith("shimmy")
        ax.bar(pos, vals, width, yerr=[err_lo, err_hi], capsize=2, label=label,
               color=cmap(i % 20), edgecolor="black" if shimmy else "none",
               linewidth=1.2 if shimmy else 0)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([report.fmt_size(x) if fig.x_name in ("size", "chunk") else str(x)
                        for x in xs])
    ax.set_xlabel(fig.x_name)
    ax.set_yscale("log")
    ax.set_ylabel(f"{fig.unit}, log scale")
    ax.set_title(f"{fig.title}\n{fig.metric}, {'lower' if fig.lower_is_better else 'higher'} is "
                 f"better; bars: median of repetitions, whiskers: min-max", fontsize=9)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt_fig.tight_layout()
    plt_fig.savefig(path)
    plt.close(plt_fig)


# -- markdown -----------------------------------------------------------------------------------

def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or x != x:
        return "-"
    if abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 10:
        text = f"{x:.1f}"
    else:
        text = f"{x:.2f}"
    return f"{text} {unit}".strip()


def _xfmt(fig: Figure, x: int) -> str:
    return report.fmt_size(x) if fig.x_name in ("size", "chunk") else str(x)


def _figure_md(fig: Figure, png: str | None) -> list[str]:
    lines = [f"### {fig.title}", ""]
    if png:
        lines += [f"![{fig.title}]({png})", ""]
    if fig.note:
        lines += [fig.note, ""]
    lines += [f"| system | {fig.x_name} | {fig.metric} (median) | spread (min–max) | "
              "wall µs/msg | CPU µs/msg (both sides) | shimmy's advantage |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for x in fig.xs():
        for p in (p for p in fig.points if p.x == x):
            r = fig.ratio(p)
            adv = "(reference)" if p is fig.shimmy(x) else (f"{r:.2f}x" if r else "-")
            note = f" ({p.note})" if p.note else ""
            lines.append(f"| {p.label}{note} | {_xfmt(fig, x)} | {_fmt(p.median, fig.unit)} | "
                         f"{_fmt(p.lo)}–{_fmt(p.hi)} | {_fmt(p.wall_us)} | {_fmt(p.cpu_us)} | "
                         f"{adv} |")
    return lines + [""]


def ratios(figs: list[Figure]) -> list[dict]:
    """shimmy's ratio to every peer on every figure (the report's summary)."""
    out = []
    for fig in figs:
        for x in fig.xs():
            s = fig.shimmy(x)
            if s is None:
                continue
            for p in fig.points:
                if p.x != x or p is s or p.transport == s.transport:
                    continue
                r = fig.ratio(p)
                if r is not None:
                    out.append({"figure": fig.id, "x": _xfmt(fig, x), "peer": p.label,
                                "shimmy": s.median, "peer_value": p.median, "unit": fig.unit,
                                "advantage": r})
    return out


def markdown(out: dict, figs: list[Figure], pngs: dict[str, str]) -> str:
    m = out["meta"]
    v = m.get("versions", {})
    lines = ["# shimmy benchmark report", "",
             f"Command: `{m.get('command', 'shimmy bench')}`  ",
             f"Run: {m['timestamp']}, {m.get('total_seconds', '?')} s, {m['reps']} repetition(s)"
             f" of {m['seconds_per_measurement']} s per measurement, niceness "
             f"{m.get('nice', '?')}.", "",
             "## Machine", "",
             f"- CPU: {m.get('cpu_model', '?')}, {m['cpu_count']} logical CPU(s), usable "
             f"{m['usable_cpus']}",
             f"- Kernel: {m.get('kernel', '?')} ({m['platform']})",
             f"- Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())
                                                    if val),
             f"- Load average at start {tuple(round(x, 2) for x in m.get('loadavg_at_start', ()))}"
             f", at end {tuple(round(x, 2) for x in m.get('loadavg_at_end', ()))}",
             f"- Placement: {m.get('placement', '')}", "",
             "The machine may be shared with other work (see the load averages): compare numbers "
             "within this run only. Each figure is the median of the repetitions, interleaved "
             "across systems; CPU time is getrusage (user + system, all threads) of both "
             "processes over the measured loop, divided by the messages; \"shimmy's "
             "advantage\" > 1 means shimmy did better (peer/shimmy for latency, shimmy/peer "
             "for rates).", ""]
    if out.get("skipped"):
        lines += ["Not measured in this run: " + "; ".join(f"{k} ({why})" for k, why in
                                                             out["skipped"].items()), ""]
    for suite, res in out.get("suites", {}).items():
        for k, why in res.get("failed", {}).items():
            lines.append(f"- FAILED {suite} {k}: {why.strip().splitlines()[-1] if why else ''}")
    lines += ["", "## Figures", ""]
    for fig in figs:
        lines += _figure_md(fig, pngs.get(fig.id))
    xn = out.get("suites", {}).get("crossnode")
    if xn and xn.get("results"):
        from .crossnode import markdown as crossnode_markdown
        lines += crossnode_markdown(xn["results"], xn.get("rtt", []))
    sc = out.get("suites", {}).get("scrape")
    if sc and sc.get("results"):
        lines += ["### Publishing while /metrics is scraped", "",
                  f"Median scrape took {_fmt(sc.get('scrape_ms_median'))} ms.", "",
                  "| row | size | msgs/s (median) | spread (min–max) | CPU µs/msg tx | "
                  "CPU µs/msg rx | vs nobody scraping |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in sc["results"]:
            rr = r.get("ratio_to_unobserved")
            _, lo, hi = _spread([run["n"] / run["rx_elapsed_s"] for run in r["runs"]])
            lines.append(f"| {r['label']} | {report.fmt_size(r['size'])} | "
                         f"{_fmt(r['msgs_per_s'])} | {_fmt(lo)}–{_fmt(hi)} | "
                         f"{_fmt(r['cpu_us_per_msg_tx'])} | "
                         f"{_fmt(r['cpu_us_per_msg_rx'])} | {f'{rr:.3f}x' if rr else '-'} |")
        lines.append("")
    rs = ratios(figs)
    if rs:
        lines += ["## shimmy against every peer", "",
                  "| figure | size / subscribers | peer | shimmy | peer | shimmy's advantage |",
                  "|---|---|---|---:|---:|---:|"]
        for r in rs:
            lines.append(f"| {r['figure']} | {r['x']} | {r['peer']} | {_fmt(r['shimmy'])} | "
                         f"{_fmt(r['peer_value'])} {r['unit']} | {r['advantage']:.2f}x |")
        lines.append("")
    if out.get("targets"):
        lines += ["## Targets", "", "| status | target | ratio |", "|---|---|---:|"]
        for t in out["targets"]:
            ratio = f"{t['ratio']:.3f}x" if t.get("ratio") is not None else "-"
            lines.append(f"| {t['status']} | {t['target']} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m shimmy.bench.publish RESULTS.json DIR``: the report of a saved run again."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m shimmy.bench.publish RESULTS.json DIR", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        out = json.load(fh)
    out.pop("ratios", None)
    print(", ".join(write(out, args[1])))
    return 0


def write(out: dict, directory: str) -> list[str]:
    """Write the report files; return their names."""
    os.makedirs(directory, exist_ok=True)
    figs = figures(out)
    out = dict(out, ratios=ratios(figs))
    with open(os.path.join(directory, "results.json"), "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    pngs: dict[str, str] = {}
    for fig in figs:
        name = fig.id.replace(":", "-") + ".png"
        _plot(fig, os.path.join(directory, name))
        pngs[fig.id] = name
    with open(os.path.join(directory, "report.md"), "w") as fh:
        fh.write(markdown(out, figs, pngs))
    return ["results.json", "report.md", *pngs.values()]


if __name__ == "__main__":
    raise SystemExit(main())
