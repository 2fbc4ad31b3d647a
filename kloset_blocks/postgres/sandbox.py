# Start the server so that nothing it runs can start a program or reach a network: `python3 -I
# sandbox.py UID GID PROGRAM ARGS...` moves to a network namespace of its own (only a loopback
# that is down: no TCP in or out; the server's Unix socket is a path, reachable from the host's
# namespace), drops to UID:GID (with the user's groups) and execs PROGRAM under a seccomp filter
# that refuses every later execve/execveat with EACCES, in PROGRAM and every process it forks.
# A backup decides which SQL the server runs (views, functions, triggers, per-database settings):
# `COPY ... TO PROGRAM`, or any *_command a setting slipped through, would run a shell as the
# postgres user, and an extension already in its catalog (dblink, postgres_fdw) would open
# connections to anywhere; here the shell never starts and there is no network. PostgreSQL itself
# never execs (Linux builds fork without exec), so the server works as before.
#
# How the one allowed exec is told apart: the filter allows execve only when its path argument is
# the address of the buffer this script passes (checked on both 32-bit halves); after that exec
# the address space is the server's, and its own execve calls (popen's "/bin/sh", in libc) pass
# other addresses. Foreign system-call ABIs (i386 compat, x32) are refused outright: an exec
# through them would not be checked.
#
# Run as a script, not imported from the package (stdlib only: it must start fast and not import
# the project under another user). Works on x86_64 and aarch64; elsewhere it refuses to start.
from __future__ import annotations

import ctypes
import os
import platform
import pwd
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
# arch -> (AUDIT_ARCH value, execve, execveat)
ARCHES = {"x86_64": (0xC000003E, 59, 322), "aarch64": (0xC00000B7, 221, 281)}
X32_BIT = 0x40000000
CLONE_NEWNET = 0x40000000


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def program(audit_arch: int, execve: int, execveat: int, path_addr: int) -> list[tuple[int, int, int, int]]:
    """The BPF program (code, jt, jf, k); jumps are relative to the next instruction. DENY is the
    last instruction (12)."""
    lo, hi = path_addr & 0xFFFFFFFF, path_addr >> 32
    return [
        (LD_W_ABS, 0, 0, 4),  # 0: arch
        (JEQ_K, 0, 10, audit_arch),  # 1: a foreign ABI -> deny
        (LD_W_ABS, 0, 0, 0),  # 2: nr
        (JGE_K, 8, 0, X32_BIT),  # 3: x32 -> deny
        (JEQ_K, 2, 0, execve),  # 4: execve -> check its path (7)
        (JEQ_K, 6, 0, execveat),  # 5: execveat -> deny
        (RET_K, 0, 0, RET_ALLOW),  # 6: anything else
        (LD_W_ABS, 0, 0, 16),  # 7: args[0], low half
        (JEQ_K, 0, 3, lo),  # 8
        (LD_W_ABS, 0, 0, 20),  # 9: args[0], high half
        (JEQ_K, 0, 1, hi),  # 10
        (RET_K, 0, 0, RET_ALLOW),  # 11: our own exec
        (RET_K, 0, 0, RET_ERRNO | 13),  # 12: DENY, EACCES
    ]


def main(argv: list[str]) -> int:
    uid, gid, prog, args = int(argv[1]), int(argv[2]), argv[3], argv[3:]
    arch = ARCHES.get(platform.machine())
    if arch is None:
        print(f"sandbox: no exec filter for {platform.machine()}: not starting", file=sys.stderr)
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        print(f"sandbox: network namespace: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    user = pwd.getpwuid(uid)
    os.initgroups(user.pw_name, gid)
    os.setgid(gid)
    os.setuid(uid)
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    path = ctypes.create_string_buffer(os.fsencode(prog))
    c_args = (ctypes.c_char_p * (len(args) + 1))(*[os.fsencode(a) for a in args], None)
    c_env = (ctypes.c_char_p * (len(env) + 1))(*[os.fsencode(f"{k}={v}") for k, v in env.items()], None)
    insns = program(*arch, ctypes.addressof(path))
    filt = (SockFilter * len(insns))(*[SockFilter(*i) for i in insns])
    fprog = SockFprog(len(insns), ctypes.cast(filt, ctypes.POINTER(SockFilter)))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        print(f"sandbox: no_new_privs: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        print(f"sandbox: seccomp: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    libc.execve(path, c_args, c_env)
    print(f"sandbox: exec {prog}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
