"""The speed report's figure, speedup.png: ours against eager and torch.compile, one bar group
per measured case, and beside it the achieved bandwidth of each case against the device's
measured copy bandwidth (the roofline of a memory-bound op)."""
from __future__ import annotations

# Keys that differ between the implementations of one case; every other key names the case.
PER_IMPL_KEYS = {"impl", "median_ms", "p25_ms", "p75_ms", "reps", "l2_flushed", "first_call_ms", "host_ms", "GB/s",
                 "TFLOP/s", "% of copy peak", "bytes", "img/s", "peak_mib"}
MODE_LABELS = {"forward": "fwd", "forward+backward": "fwd+bwd", "eval forward": "eval fwd",
               "train forward+backward": "train fwd+bwd"}
INCH_PER_CASE = 0.3
SPEEDUP_TICKS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]


def case_label(row: dict) -> str:
    parts = [f"MPViT-{row['model']}" if "model" in row else row["op"]]
    for key in ("scope", "site"):
        if key in row:
            parts.append(str(row[key]))
    if "input" in row:
        parts.append(f"{row['input']}px")
    if "stage" in row:
        parts.append(f"stage {row['stage']}")
    if "stride" in row:
        parts.append(f"s{row['stride']}")
    parts += [row["dtype"], MODE_LABELS.get(row["mode"], row["mode"])]
    return " ".join(parts)


def measured_cases(rows: list[dict]) -> list[dict]:
    """The timed rows (the traffic model's are counted, not timed) gathered per case, in report
    order: {"label", "impls": {impl: row}}."""
    cases: dict[tuple, dict] = {}
    for row in rows:
        if "median_ms" not in row:
            continue
        key = tuple((k, str(v)) for k, v in row.items() if k not in PER_IMPL_KEYS)
        case = cases.setdefault(key, {"label": case_label(row), "impls": {}})
        case["impls"][row["impl"]] = row
    return list(cases.values())


def achieved_gbs(row: dict) -> float | None:
    # attention's bytes are our kernels' alone: for the whole module they are no bandwidth
    if row.get("op") == "factor_attention" and row.get("scope") == "module":
        return None
    return row.get("GB/s")


def draw_speedup(rows: list[dict], peak_gbs: float | None, title: str, path: str) -> str | None:
    """Writes the figure to ``path``; returns None, or why nothing was drawn."""
    cases = measured_cases(rows)
    if not cases:
        return "no timed rows in this run (the traffic model is counted, not timed)"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        return f"matplotlib is missing ({e}); pip install matplotlib, or the package's bench extra"

    fig = Figure(figsize=(16, 1.8 + INCH_PER_CASE * len(cases)), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    speed, roof = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    fig.suptitle(title)
    ys = range(len(cases))
    _speedup_panel(speed, cases)
    speed.set_yticks(list(ys), [c["label"] for c in cases], fontsize=7)
    speed.set_ylim(len(cases) - 0.5, -0.5)  # first case on top, as in the report
    _roofline_panel(roof, cases, peak_gbs)
    # one legend for both panels, below them: clear of the bars and of the cases' notes
    if any(ax.get_legend_handles_labels()[0] for ax in (speed, roof)):  # none when nothing of ours was timed
        fig.legend(loc="outside lower center", ncols=6, fontsize=8, frameon=False)
    fig.savefig(path, dpi=100)
    return None


def _speedup_panel(ax, cases: list[dict]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    height = 0.38
    drawn = {"vs eager": False, "vs torch.compile": False}
    speedups = []
    for y, case in enumerate(cases):
        impls = case["impls"]
        ours = impls.get("ours")
        if ours is None:
            ax.text(1.0, y, "  no 'ours' timing on this device (eager"
                    + (" and torch.compile" if "torch.compile" in impls else "") + " only)",
                    va="center", fontsize=7, color="dimgray")
            continue
        for offset, (name, base_impl, color) in ((-height / 2, ("vs eager", "eager", "tab:blue")),
                                                 (height / 2, ("vs torch.compile", "torch.compile", "tab:orange"))):
            if base_impl not in impls:
                continue
            speedup = impls[base_impl]["median_ms"] / ours["median_ms"]
            speedups.append(speedup)
            # from 1 (as fast) to the speedup: a slowdown points left
            ax.barh(y + offset, speedup - 1, left=1, height=height, color=color,
                    label=None if drawn[name] else f"ours {name}")
            drawn[name] = True
            ax.text(speedup, y + offset, f" {speedup:.2f}x ",
                    va="center", ha="left" if speedup >= 1 else "right", fontsize=6)
    ax.set_title("ours vs eager and vs torch.compile")
    ax.set_xscale("log")
    low, high = min([0.5] + [s / 1.5 for s in speedups]), max([4.0] + [s * 1.5 for s in speedups])
    ax.set_xlim(low, high)
    ax.set_xticks([t for t in SPEEDUP_TICKS if low <= t <= high])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of ours (median time of the other / ours; log scale, 1 = as fast)")
    ax.grid(axis="x", which="both", alpha=0.3)


def _roofline_panel(ax, cases: list[dict], peak_gbs: float | None) -> None:
    if not peak_gbs:
        ax.text(0.5, 0.5, "no copy bandwidth measured on this device (CPU run):\nno roofline",
                ha="center", va="center", transform=ax.transAxes, fontsize=10)
        ax.set_xticks([])
        ax.set_title("achieved bandwidth vs measured copy bandwidth")
        return
    impls = (("eager", "tab:gray"), ("torch.compile", "tab:purple"), ("ours", "tab:green"))
    height = 0.8 / len(impls)
    drawn = set()
    for y, case in enumerate(cases):
        for i, (impl, color) in enumerate(impls):
            gbs = achieved_gbs(case["impls"][impl]) if impl in case["impls"] else None
            if gbs is None:
                continue
            ax.barh(y + (i - 1) * height, gbs, height=height, color=color, label=None if impl in drawn else f"{impl} GB/s")
            drawn.add(impl)
    ax.axvline(peak_gbs, color="red", linestyle="--", label=f"measured copy bandwidth {peak_gbs:.0f} GB/s")
    ax.set_xlabel("achieved GB/s (the row's minimum bytes / median time)")
    ax.set_title("achieved bandwidth vs measured copy bandwidth")
    ax.grid(axis="x", alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no row carries an achieved GB/s", ha="center", va="center", transform=ax.transAxes)
