#!/usr/bin/env bash
# Builds the C demos, runs each natively and under `ufcram run` with a resident limit of
# a quarter of its working set, and compares the checksums; exits 1 if any differ.
# UFCRAM is the ufcram command (default: ufcram on PATH), e.g. UFCRAM=.venv/bin/ufcram.
# Sizes are picked so that each ufcram run takes seconds, not minutes, on 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a ufcram <<< "${UFCRAM:-ufcram}"
if ! command -v "${ufcram[0]}" >/dev/null; then
  echo "run_demos: ${ufcram[0]} not found; set UFCRAM to the ufcram command" >&2
  exit 2
fi
bash demos/build.sh
bin=$PWD/demos/bin
failed=0

# demo NAME "RUN OPTIONS" ARGS...: the timings and the ufcram summary go to stderr, so
# they show.
demo() {
  local name=$1 native managed rc=0 verdict=same
  read -r -a options <<< "$2"
  shift 2
  echo "== $name $* (ufcram run ${options[*]})"
  native=$("$bin/$name" "$@") || rc=$?
  grep -v '^checksum ' <<< "$native" || true
  managed=$("${ufcram[@]}" run "${options[@]}" -- "$bin/$name" "$@") || rc=$?
  native=$(sed -n 's/^checksum //p' <<< "$native")
  managed=$(sed -n 's/^checksum //p' <<< "$managed")
  if [ "$rc" -ne 0 ]; then
    verdict="FAILED (exit status $rc)"
  elif [ -z "$native" ] || [ "$native" != "$managed" ]; then
    verdict=DIFFERENT
  fi
  [ "$verdict" = same ] || failed=1
  printf 'checksum native %s  ufcram %s  %s\n\n' "${native:-none}" "${managed:-none}" "$verdict"
}

demo kvstore "--resident-limit 16M" --mib 64     # one 64 MiB table
# a small write budget: writes to demoted pages past it promote them
demo writeheavy "--resident-limit 8M --write-budget 64" --mib 32   # one 32 MiB table
demo scan "--resident-limit 16M" --mib 32        # the array and its copy, 32 MiB each
exit "$failed"
