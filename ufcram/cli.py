"""The `ufcram` command line: one subcommand per job (check for now)."""
import argparse
import json
import sys


def cmd_check(args):
    from .check import format_report, report
    r = report()
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["works"] else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="ufcram", description="compressed RAM for Linux "
                                     "processes, in user space (CRAM semantics over userfaultfd)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="what this kernel and user allow, and a verdict")
    check.add_argument("--json", action="store_true", help="print the facts as JSON")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
