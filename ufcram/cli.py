"""The `ufcram` command line: one subcommand per job (check, bench)."""
import argparse
import json
import sys


def cmd_check(args):
    from .check import format_report, report
    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["works"] else 1


def cmd_bench(args):
    from .bench import main as bench
    return bench(args)


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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
