"""What `ufcram bench` prints: ufcram/zram ratios, each target with met / NOT met, the
table with a note on what was measured, and the optional PNG chart.
"""
import importlib.util

from .work import MiB, TITLES, WORKLOADS
from ufcram.store.pagetable import PAGE_SIZE

# (workload, what, target ratio ufcram/zram, higher is better)
TARGETS = (("seq_scan", "pages/s", 1.5), ("random_read", "pages/s", 1.0),
           ("random_write", "pages/s", 0.7))
REDEMOTE_TARGET = 10.0    # first demotion cost / clean re-demotion cost, ufcram alone
FOOTPRINT_TARGET = 1.0    # ufcram footprint / zram footprint, at most
READS = ("seq_scan", "random_read", "hot_mix")   # their checksums must agree across sides


def _ratio(a, b):
    return a / b if a and b else None


def ratios(u, z):
    """ufcram/zram per workload: pages/s (higher is better), footprint and compression."""
    return {w: {"pages_per_s": _ratio(u[w]["pages_per_s"], z[w]["pages_per_s"]),
                "footprint": _ratio(u[w]["footprint_bytes"], z[w]["footprint_bytes"]),
                "comp_ratio": _ratio(u[w]["comp_ratio"], z[w]["comp_ratio"])}
            for w in WORKLOADS}


def _verdict(name, target, measured, met, note=""):
    return {"target": name, "goal": target, "measured": measured, "met": met, "note": note}


def targets(u, z, r):
    out = []
    for w, what, goal in TARGETS:
        measured = r[w]["pages_per_s"] if r else None
        out.append(_verdict(f"{TITLES[w]} {what}", f">= {goal}x zram", measured,
                            None if measured is None else measured >= goal))
    cost = u["redemote"]["cost_ratio"]
    out.append(_verdict("re-demoting clean read-only pages", f">= {REDEMOTE_TARGET:g}x cheaper "
                        "than first demotion", cost, None if cost is None
                        else cost >= REDEMOTE_TARGET, "ufcram alone"))
    if r:
        worst = max(WORKLOADS, key=lambda w: r[w]["footprint"] or 0)
        measured = r[worst]["footprint"]
        out.append(_verdict("footprint", "<= zram's", measured,
                            None if measured is None else measured <= FOOTPRINT_TARGET,
                            f"worst: {TITLES[worst]}"))
    else:
        out.append(_verdict("footprint", "<= zram's", None, None))
    return out


def summarise(report):
    u, z = report["ufcram"], report["zram"]
    have_zram = "skipped" not in z
    r = ratios(u, z) if have_zram else None
    same = all(u[w]["checksum"] == z[w]["checksum"] for w in READS) if have_zram else None
    return {"ratios": r, "targets": targets(u, z, r), "same_data": same}


# --- the table ---------------------------------------------------------------------------
def _num(value, fmt, unit=""):
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _row(label, side, m):
    return (f"  {label:<34} {side:<7} {_num(m.get('pages_per_s'), ',.0f'):>10} "
            f"{_num(m.get('elapsed_s'), '.2f', ' s'):>8} {_num(m.get('p50_us'), '.1f'):>8} "
            f"{_num(m.get('p99_us'), '.1f'):>8} "
            f"{str(m.get('swapins', '-')) + '/' + str(m.get('swapouts', '-')):>13} "
            f"{_num(m.get('footprint_bytes') and m['footprint_bytes'] / MiB, '.1f'):>8} "
            f"{_num(m.get('comp_ratio'), '.2f', 'x'):>6}")


def _ratio_row(r):
    return (f"  {'':<34} {'u/z':<7} {_num(r['pages_per_s'], '.2f', 'x'):>10} {'':>8} {'':>8} "
            f"{'':>8} {'':>13} {_num(r['footprint'], '.2f', 'x'):>8} "
            f"{_num(r['comp_ratio'], '.2f', 'x'):>6}")


def _redemote_line(side, m):
    f, a = m["first"], m["again"]
    return (f"  {'':<34} {side:<7} first demotion {_num(f['us_per_page'], '.1f')} µs/page "
            f"({f['pages']} pages), again {_num(a['us_per_page'], '.1f')} µs/page "
            f"({a['pages']}): {_num(m['cost_ratio'], '.1f', 'x')} cheaper")


def _floor(floor):
    if "skipped" in floor:
        return f"n/a ({floor['skipped']})"
    return "; ".join(f"{where} p50 {floor[key]['p50_us']:.1f} µs, p99 "
                     f"{floor[key]['p99_us']:.1f} µs"
                     for key, where in (("same_cpu", "one CPU"), ("cross_cpu", "two CPUs"))
                     if key in floor)


def _header(report):
    plan, floor, z = report["plan"], report["floor"], report["zram"]
    pages, limit = plan["pages"], plan["limit_pages"]
    lines = [f"ufcram bench: working set {pages * PAGE_SIZE / MiB:g} MiB ({pages} pages), "
             f"resident limit {limit * PAGE_SIZE / MiB:g} MiB ({limit} pages), same seeded "
             "data on both sides"]
    lines.append("  floor, a bare userfaultfd round trip in C (fault in one thread, UFFDIO_COPY in "
                 "another):\n    " + _floor(floor))
    if report.get("floor_fast_wake"):
        lines.append("    with fast wake-ups (UFCRAM_FAST_WAKE_MS; held for both sides): " +
                     _floor(report["floor_fast_wake"]))
    if "skipped" in z:
        lines.append(f"  zram: not measured: {z['skipped']}; ufcram alone")
    else:
        lines.append(f"  zram: lz4 swap on {z['device']}, cgroup {z['cgroup']}; data checksums "
                     f"{'equal' if report['summary']['same_data'] else 'DIFFER'}\n    cgroup "
                     f"limit = the resident limit + the {z['baseline_charge_bytes'] / MiB:.1f} "
                     "MiB the child had charged before the working set existed")
        if z.get("oom_kills"):
            lines.append(f"  zram: the kernel OOM-killed its child {z['oom_kills']} time(s) "
                         "under that limit (swap free); these results are from a rerun")
    return lines


NOTES = """\
  pages/s: accesses per second, one byte per access, each access timed alone
    (perf_counter_ns; its ~0.2 µs of Python is in both sides). p50/p99 µs: per access, over
    all accesses, resident hits included. in/out: ufcram restores / demotions (dirty and
    clean); zram major faults of the child (whatever it swaps in) / pswpout + swpout_zero.
  footprint: ufcram growth of the application's anon+shmem RSS + pool mem_used_total (the
    handler process itself, {handler:.0f} MiB RSS, is not counted); zram growth of the
    cgroup's charge + mm_stat mem_used_total. comp: each store's orig_data_size /
    mem_used_total (zero pages never reach zram, the swap layer keeps them; ufcram stores
    them as same-filled pages of 0 bytes).
  re-demotion: region.demote() of written pages, then of the same pages read back clean;
    zram: MADV_PAGEOUT of the same pages. µs/page = time of the calls / pages they moved,
    over {rounds} rounds."""


def table(report):
    u, z, s = report["ufcram"], report["zram"], report["summary"]
    lines = _header(report) + ["", f"  {'workload':<34} {'side':<7} {'pages/s':>10} "
                               f"{'elapsed':>8} {'p50 µs':>8} {'p99 µs':>8} {'in/out':>13} "
                               f"{'MiB':>8} {'comp':>6}"]
    for w in WORKLOADS:
        lines.append(_row(TITLES[w], "ufcram", u[w]))
        if "skipped" not in z:
            lines.append(_row("", "zram", z[w]))
            lines.append(_ratio_row(s["ratios"][w]))
        if w == "redemote":
            lines.append(_redemote_line("ufcram", u[w]))
            if "skipped" not in z:
                lines.append(_redemote_line("zram", z[w]))
    lines += ["", f"  {'target':<36} {'goal':<44} {'measured':>9}  verdict"]
    for t in s["targets"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"  {t['target']:<36} {t['goal']:<44} "
                     f"{_num(t['measured'], '.2f', 'x'):>9}  {verdict}{note}")
    lines += ["", NOTES.format(handler=u["handler_rss_bytes"] / MiB, rounds=u["redemote"]["rounds"])]
    return "\n".join(lines)


# --- the chart ---------------------------------------------------------------------------
def can_plot():
    return importlib.util.find_spec("matplotlib") is not None


def plot(report, path):
    """A PNG bar chart of ufcram/zram ratios per workload (pages/s and footprint)."""
    import matplotlib
    matplotlib.use("Agg")   # a file, never a window
    import matplotlib.pyplot as plt
    r = report["summary"]["ratios"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if r is None:
        ax.text(0.5, 0.5, f"no zram: {report['zram']['skipped']}", ha="center", wrap=True)
    else:
        names = [TITLES[w] for w in WORKLOADS]
        x = range(len(WORKLOADS))
        for shift, key, label in ((-0.2, "pages_per_s", "pages/s (higher is better)"),
                                  (0.2, "footprint", "footprint (lower is better)")):
            ax.bar([i + shift for i in x], [r[w][key] or 0 for w in WORKLOADS], 0.4,
                   label=label)
        ax.set_yscale("log")   # ratios from ~0.03x to ~30x
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(x), names, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("ufcram / zram")
        ax.legend()
    ax.set_title(f"ufcram bench: working set {report['plan']['pages'] * PAGE_SIZE / MiB:g} MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
