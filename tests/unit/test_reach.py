"""ufcram.reach on files made here: ELF headers written byte by byte (ELF64 and ELF32, with
and without PT_INTERP), scripts with `#!` lines, set-ID bits and file capabilities."""
import os
import shutil
import struct

import pytest

from ufcram.tools import reach

pytestmark = [pytest.mark.timeout(30)]

PT_LOAD, PT_INTERP, PT_DYNAMIC = 1, 3, 2


def elf(path, bits, types):
    """An executable ELF file whose program headers have these types (nothing else in it
    is valid: only the headers are read)."""
    if bits == 64:
        phentsize, phoff = 56, 64
        header = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, 62, 1,
                             0x401000, phoff, 0, 0, 64, phentsize, len(types), 0, 0, 0)
    else:
        phentsize, phoff = 32, 52
        header = struct.pack("<4sBBBB8xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 2, 3, 1,
                             0x8048000, phoff, 0, 0, 52, phentsize, len(types), 0, 0, 0)
    assert len(header) == phoff
    table = b"".join(struct.pack("<I", t).ljust(phentsize, b"\0") for t in types)
    path.write_bytes(header + table)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("bits", [64, 32])
def test_elf_program_headers_tell_dynamic_from_static(tmp_path, bits):
    dynamic = elf(tmp_path / "dynamic", bits, [PT_LOAD, PT_INTERP, PT_DYNAMIC])
    static = elf(tmp_path / "static", bits, [PT_LOAD, PT_LOAD])
    assert reach.elf_has_interpreter(dynamic) is True
    assert reach.elf_has_interpreter(static) is False
    assert reach.unreachable(os.fspath(dynamic)) is None
    assert reach.unreachable(os.fspath(static)) == (
        f"{static} is statically linked: no loader reads LD_PRELOAD for it")


def test_what_is_no_elf_or_is_cut_short_says_nothing(tmp_path):
    text = tmp_path / "text"
    text.write_bytes(b"just some bytes\n")
    text.chmod(0o755)
    cut = tmp_path / "cut"
    cut.write_bytes(elf(tmp_path / "whole", 64, [PT_LOAD, PT_INTERP]).read_bytes()[:70])
    cut.chmod(0o755)
    for path in (text, cut, tmp_path / "missing"):
        assert reach.elf_has_interpreter(path) is None
        assert reach.unreachable(os.fspath(path)) is None


def test_a_real_dynamic_program_is_reachable():
    sh = shutil.which("sh")
    assert reach.elf_has_interpreter(os.path.realpath(sh)) is True
    assert reach.unreachable("sh") is None


def test_program_is_found_on_path_as_posix_spawnp_would(tmp_path, monkeypatch):
    elf(tmp_path / "static-prog", 64, [PT_LOAD])
    monkeypatch.setenv("PATH", f"/nonexistent:{tmp_path}")
    assert reach.unreachable("static-prog").startswith(f"{tmp_path / 'static-prog'} is "
                                                       "statically linked")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert reach.unreachable("static-prog") is None   # the spawn reports it missing


@pytest.mark.parametrize("line", ["#!{static}", "#! {static} -x", "#!/usr/bin/env static-prog",
                                  "#!/usr/bin/env -S A=1 static-prog --flag"])
def test_a_script_is_judged_by_its_interpreter(tmp_path, monkeypatch, line):
    static = elf(tmp_path / "static-prog", 64, [PT_LOAD])
    script = tmp_path / "script"
    script.write_text(line.format(static=static) + "\necho hello\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert reach.unreachable(os.fspath(script)) == (
        f"{static} (the interpreter of {script}) is statically linked: no loader reads "
        "LD_PRELOAD for it")


def test_a_script_of_a_dynamic_interpreter_is_reachable(tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    assert reach.unreachable(os.fspath(script)) is None


@pytest.mark.root
@pytest.mark.parametrize("mode, owner, why", [
    (0o4755, (65534, 0), "set-user-ID"),
    (0o2755, (0, 65534), "set-group-ID"),
    (0o4755, (0, 0), None),              # set-user-ID to ourselves: no change, no secure mode
    (0o2745, (0, 65534), None)],          # no group execute: the bit is no set-group-ID
    ids=["setuid", "setgid", "setuid-to-self", "setgid-without-gx"])
def test_set_id_programs_that_change_our_ids_are_named(tmp_path, mode, owner, why):
    """Root: chown to nobody. tmp_path must not be on a nosuid mount."""
    prog = elf(tmp_path / "prog", 64, [PT_LOAD, PT_INTERP])
    os.chown(prog, *owner)
    prog.chmod(mode)
    if os.statvfs(prog).f_flag & os.ST_NOSUID:
        assert reach.unreachable(os.fspath(prog)) is None
        pytest.skip(f"{tmp_path} is on a nosuid mount")
    expected = None if why is None else f"{prog} is {why}: the loader ignores LD_PRELOAD for it"
    assert reach.unreachable(os.fspath(prog)) == expected


@pytest.mark.root
def test_file_capabilities_matter_to_other_users_than_root(tmp_path, monkeypatch):
    """Root: sets a security.capability xattr (cap_net_raw+ep, VFS_CAP_REVISION_2)."""
    prog = elf(tmp_path / "prog", 64, [PT_LOAD, PT_INTERP])
    try:
        os.setxattr(prog, "security.capability",
                    struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0))
    except OSError as e:
        pytest.skip(f"cannot set file capabilities here: {e}")
    assert reach.unreachable(os.fspath(prog)) is None   # root gains nothing from them
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    assert reach.unreachable(os.fspath(prog)) == (
        f"{prog} is given file capabilities: the loader ignores LD_PRELOAD for it")
