#!/usr/bin/env bash
# The demos' own build script: compiles each demo into demos/bin/ with gcc alone (a fresh
# machine has gcc but not necessarily make). CC and CFLAGS may be overridden; `clean` removes bin/.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = clean ]; then
  rm -rf bin
  exit 0
fi
CC=${CC:-gcc}
read -r -a flags <<< "${CFLAGS:--O2 -Wall -Wextra -std=gnu11}"
mkdir -p bin
for demo in kvstore writeheavy scan; do
  # rebuilt only when its source or the shared header is newer than the program
  if [ ! bin/$demo -nt $demo.c ] || [ ! bin/$demo -nt demo.h ]; then
    "$CC" "${flags[@]}" -pthread -o bin/$demo $demo.c   # -pthread: flags may not drop it
  fi
done
