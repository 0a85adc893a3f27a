"""The one list of native sources, by program: setup.py builds the preload library from it
and build_shim.py the cffi shim. (Run with runpy: native/ is not a package.)"""

# the agent (commands, what it keeps for after a handler death, the fallback watcher and
# its span set, its own threads) over the uffd calls: in both the shim and the library
AGENT = ["uffd.c", "agent.c", "adopted.c", "own.c", "fallback.c", "dropped.c"]
# the cffi shim the handler and Python regions use: the agent, the pool's entry decoder
# and the fault fast path
SHIM = AGENT + ["entries.c", "fastpath.c"]
# the library `ufcram run` preloads: joining, its triggers, what it registers, its link
PRELOAD = ["preload.c", "coverage.c", "nodelink.c"] + AGENT
