"""`ufcram check`: what this machine's kernel and permissions allow, and a plain verdict
on whether ufcram will work here and why."""
import errno
import os
import platform

from ufcram._shim import lib
from ufcram.app.uffd import FEATURES, PERMISSION_HINT, REQUIRED, feature_names

# what each optional feature buys; ufcram degrades without them
USES = {
    "WP": "read-only mappings and write faults (required)",
    "WP_UNPOPULATED": "write-protecting untouched pages",
    "MOVE": "moving pages within the application without a copy",
    "POISON": "failing loudly (SIGBUS) instead of reading zeros if data is lost",
    "THREAD_ID": "telling the agent's faults from the application's",
    "EVENT_FORK": "forked children keep their demoted memory",
    "EVENT_REMOVE": "reaping entries of MADV_DONTNEED'd pages",
    "EVENT_UNMAP": "reaping entries of munmap'd ranges",
    "EVENT_REMAP": "following mremap",
}


def _probe(open_fn, flags=0):
    """(supported feature mask, None) or (0, errno) for one way of opening a uffd."""
    fd = open_fn(flags)
    if fd < 0:
        return 0, -fd
    try:
        from ufcram._shim import ffi
        feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rc = lib.ufc_uffd_api(fd, 0, feats, ioctls)
        return (int(feats[0]), None) if rc == 0 else (0, -rc)
    finally:
        os.close(fd)


def _sysctl():
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return int(f.read())
    except OSError:
        return None


def report():
    """Facts and verdict as a dict (the CLI prints it, --json dumps it)."""
    sysctl = _sysctl()
    syscall_features, syscall_err = _probe(lib.ufc_uffd_open_syscall)
    dev_features, dev_err = _probe(lib.ufc_uffd_open_dev)
    umo_features, umo_err = _probe(lib.ufc_uffd_open_syscall, lib.UFFD_USER_MODE_ONLY)
    if syscall_err is None:
        mode = ("root" if os.geteuid() == 0 else
                "vm.unprivileged_userfaultfd=1" if sysctl == 1 else "userfaultfd(2) allowed")
        features = syscall_features
    elif dev_err is None:
        mode, features = "/dev/userfaultfd access", dev_features
    elif umo_err is None:
        mode, features = "UFFD_USER_MODE_ONLY only", umo_features
    else:
        mode, features = "none", 0
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "euid": os.geteuid(),
        "unprivileged_userfaultfd": sysctl,
        "dev_userfaultfd": os.path.exists("/dev/userfaultfd"),
        "dev_userfaultfd_error": None if dev_err is None else errno.errorcode.get(dev_err),
        "syscall_error": None if syscall_err is None else errno.errorcode.get(syscall_err),
        "permission": mode,
        "features": feature_names(features),
        "features_mask": features,
        **_verdict(mode, features),
    }


def _verdict(mode, features):
    if mode == "none":
        return {"works": False, "verdict": "ufcram will NOT work here: " + PERMISSION_HINT}
    if features & REQUIRED != REQUIRED:
        return {"works": False, "verdict": "ufcram will NOT work here: this kernel's "
                "userfaultfd has no write-protect on anonymous memory (needs Linux 5.19+)."}
    if mode == "UFFD_USER_MODE_ONLY only":
        return {"works": True, "verdict": "ufcram works here only with "
                "UFCRAM_USER_MODE_ONLY=1: system calls that touch a demoted page will fail "
                "with EFAULT. " + PERMISSION_HINT}
    missing = [n for n in USES if not features & FEATURES[n]]
    tail = f" Missing (ufcram degrades): {', '.join(missing)}." if missing else ""
    return {"works": True, "verdict": f"ufcram will work here: userfaultfd through {mode}, "
            f"with write-protect on anonymous memory.{tail}"}


def format_report(r):
    lines = [f"kernel          {r['kernel']} ({r['machine']})",
             f"permission      {r['permission']} (euid {r['euid']}, "
             f"vm.unprivileged_userfaultfd={r['unprivileged_userfaultfd']}, /dev/userfaultfd "
             f"{'present' if r['dev_userfaultfd'] else 'absent'})",
             f"features        {hex(r['features_mask'])}"]
    for name in USES:
        mark = "yes" if name in r["features"] else "no "
        lines.append(f"  {name:<15}{mark}  {USES[name]}")
    lines.append("")
    lines.append(r["verdict"])
    return "\n".join(lines)
