"""The `ufcram` command line: one subcommand per job (check, bench, stat, run, node)."""
import argparse
import json
import math
import os
import sys

from ufcram.errors import UfcramError


def cmd_check(args):
    from .check import format_report, report
    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["works"] else 1


def cmd_bench(args):
    from ufcram.tools.bench.main import main as bench
    return bench(args)


def cmd_stat(args):
    from .stat import main as stat
    return stat(args)


def cmd_run(args):
    from .run import main as run
    return run(args)


def cmd_node(args):
    from ufcram.handler.loop import main as handler
    argv = ["--listen", args.listen, "--persist"]
    if args.capacity is not None:
        argv += ["--capacity", str(args.capacity)]
    return handler(argv)


def add_run(sub):
    from .run import budget, size
    run = sub.add_parser("run", help="run an unmodified program with its large allocations "
                         "on a node (LD_PRELOAD), then summarize",
                         usage="ufcram run [options] [--] cmd args...")
    run.add_argument("--resident-limit", type=size, metavar="SIZE",
                     help="resident limit over the program's managed memory, e.g. 64M "
                     "(UFCRAM_RESIDENT_LIMIT)")
    run.add_argument("--write-budget", type=budget, metavar="PAGES",
                     help="write budget per allocation: pages or 'auto' (UFCRAM_WRITE_BUDGET)")
    run.add_argument("--capacity", type=size, metavar="SIZE",
                     help="capacity of the private node's pool (UFCRAM_NODE_CAPACITY)")
    run.add_argument("--threshold", type=size, metavar="SIZE",
                     help="allocations larger than this are managed (UFCRAM_THRESHOLD)")
    run.add_argument("--node", metavar="PATH", default=os.environ.get("UFCRAM_NODE") or None,
                     help="join the running node at PATH instead of starting one "
                     "(UFCRAM_NODE)")
    run.add_argument("--strict", action="store_true",
                     help="refuse (status 2) a program the preload library cannot enter: "
                     "statically linked, set-user-ID or set-group-ID")
    run.add_argument("--quiet", action="store_true", help="no summary")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the program and its arguments")
    run.set_defaults(func=cmd_run)


def add_node(sub):
    from .run import size
    node = sub.add_parser("node", help="run a node in the foreground that programs join "
                          "(ufcram run --node PATH), until interrupted")
    node.add_argument("--listen", metavar="PATH", required=True,
                      help="its Unix socket (mode 0600)")
    node.add_argument("--capacity", type=size, metavar="SIZE",
                      help="pool capacity (UFCRAM_NODE_CAPACITY)")
    node.set_defaults(func=cmd_node)


def positive(parse):
    """An argparse type: a finite number above 0, as `parse` reads it."""
    def convert(text):
        value = parse(text)
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    convert.__name__ = parse.__name__   # argparse names the type in its messages
    return convert


def build_parser():
    parser = argparse.ArgumentParser(prog="ufcram", description="compressed RAM for Linux "
                                     "processes, in user space (CRAM semantics over userfaultfd)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="what this kernel and user allow, and a verdict")
    check.add_argument("--json", action="store_true", help="print the facts as JSON")
    check.set_defaults(func=cmd_check)
    bench = sub.add_parser("bench", help="the same workloads on ufcram and on kernel zram (lz4) "
                           "swap under an equal cgroup limit, side by side")
    bench.add_argument("--quick", action="store_true", help="small sizes: well under a minute")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--plot", metavar="FILE", help="also write a PNG chart of the ratios "
                       "(needs matplotlib)")
    bench.add_argument("--mib", type=int, help="working set in MiB (resident limit: a quarter)")
    bench.set_defaults(func=cmd_bench)
    stat = sub.add_parser("stat", help="a node's compression and its clients, like zramctl; "
                          "with an interval, again and again like vmstat")
    stat.add_argument("--node", metavar="PATH", help="the node's socket (default: $UFCRAM_NODE)")
    stat.add_argument("--json", action="store_true", help="print the node's raw JSON, a line "
                      "per sample")
    stat.add_argument("--bytes", action="store_true", help="sizes in bytes, not K/M/G")
    stat.add_argument("interval", nargs="?", type=positive(float), help="seconds between samples")
    stat.add_argument("count", nargs="?", type=positive(int), help="how many samples (default: "
                      "forever)")
    stat.set_defaults(func=cmd_stat)
    add_run(sub)
    add_node(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UfcramError as e:   # a clear line, not a traceback
        print(f"ufcram: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
