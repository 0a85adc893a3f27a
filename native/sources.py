"""The one list of native sources, by program: setup.py builds the preload library from it
and build_shim.py the cffi shim. (Run with runpy: native/ is not a package.)"""

# every folder's headers are reachable by bare name from every source
INCLUDE_DIRS = ["native/common", "native/agent", "native/engine", "native/preload"]
# the agent (commands, what it keeps for after a handler death, the watcher and its span
# set, its own threads) over the uffd calls: in both the shim and the library
AGENT = ["common/uffd.c", "agent/agent.c", "agent/adopted.c", "agent/own.c",
         "agent/watcher.c", "agent/spans.c", "agent/move.c"]
# the cffi shim the handler and Python regions use: the agent, the pool's entry decoder
# and the fault engine
SHIM = AGENT + ["common/entries.c", "engine/plan.c", "engine/faults.c"]
# the library `ufcram run` preloads: joining, its triggers, what it registers, its link
PRELOAD = ["preload/preload.c", "preload/coverage.c", "preload/nodelink.c"] + AGENT
