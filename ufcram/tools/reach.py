"""What the preload library can reach: `ufcram run` asks before it starts a program, so
that one it cannot enter (no loader, or a loader that drops LD_PRELOAD) is named, not silent.
"""
import os
import shutil
import stat
import struct

PT_INTERP = 3
# the kernel reads this much of a script's first line (BINPRM_BUF_SIZE) and follows at
# most a few interpreters in a row
SHEBANG_BYTES = 256
INTERPRETER_DEPTH = 4


def resolve(name):
    """The file that posix_spawnp would run for `name` (PATH searched when it has no
    slash; glibc's default path when PATH is unset), or None if there is none."""
    path = os.environ.get("PATH")
    if path is None:
        path = os.confstr("CS_PATH") or "/bin:/usr/bin"
    return shutil.which(name, path=path)


def elf_has_interpreter(path):
    """True if the ELF file has a PT_INTERP program header (a loader runs it, so
    LD_PRELOAD applies), False if it has none (statically linked, static-pie
    included), None if it is no little-endian ELF file we can read."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 52 or header[:4] != b"\x7fELF" or header[5] != 1:
                return None
            if header[4] == 2 and len(header) == 64:        # ELF64
                (phoff,) = struct.unpack_from("<Q", header, 32)
                phentsize, phnum = struct.unpack_from("<HH", header, 54)
            elif header[4] == 1:                             # ELF32
                (phoff,) = struct.unpack_from("<I", header, 28)
                phentsize, phnum = struct.unpack_from("<HH", header, 42)
            else:
                return None
            if phentsize < 4:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    if len(table) < phentsize * phnum:
        return None
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == PT_INTERP
               for i in range(phnum))


def interpreter(path):
    """What a `#!` script runs as the program: its interpreter, or for `/usr/bin/env
    [options] prog` the prog it finds on PATH (env itself execs it with our
    environment). None if the file is no script or names nothing that exists."""
    try:
        with open(path, "rb") as f:
            first = f.read(SHEBANG_BYTES)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return None
    if os.path.basename(words[0]) == "env":
        # skip env's options (-S, -i, ...) and VAR=value settings
        rest = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return resolve(rest[0]) if rest else None
    return resolve(words[0])


def secure_exec(path, st):
    """Why the loader would run `path` in secure mode (AT_SECURE), which drops
    LD_PRELOAD: a set-user-ID or set-group-ID file that changes our ids, or file
    capabilities for a user other than root. None if it would not."""
    if os.statvfs(path).f_flag & os.ST_NOSUID:
        return None   # the kernel ignores both bits and capabilities there
    if st.st_mode & stat.S_ISUID and st.st_uid != os.getuid():
        return "set-user-ID"
    # without group execute permission the set-group-ID bit means something else
    if (st.st_mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP
            and st.st_gid != os.getgid()):
        return "set-group-ID"
    if os.getuid() != 0:
        try:
            os.getxattr(path, "security.capability")
            return "given file capabilities"
        except OSError:
            pass
    return None


def unreachable(name):
    """One line on why the preload library cannot enter the program `name`, or None
    if it can (or if we cannot tell: the spawn will report a missing program)."""
    path = resolve(name)
    script = None
    for _ in range(INTERPRETER_DEPTH):
        if path is None:
            return None
        inner = interpreter(path)
        if inner is None:
            break
        script = script or path
        path = inner
    else:
        return None
    what = path if script is None else f"{path} (the interpreter of {script})"
    try:
        why = secure_exec(path, os.stat(path))
    except OSError:
        return None
    if why is not None:
        return f"{what} is {why}: the loader ignores LD_PRELOAD for it"
    if elf_has_interpreter(path) is False:
        return f"{what} is statically linked: no loader reads LD_PRELOAD for it"
    return None
