# The parent that nbdkit needs: in the foreground nbdkit sets PR_SET_PDEATHSIG (Debian's 1.32.5, with
# or without --exit-with-parent), so it gets SIGTERM when its parent exits; its parent must live
# exactly as long as it does, never the short-lived CLI that started the chain.
#
#   python -I -S keeper.py ARGV...     (its own session; the environment changes arrive on stdin)
#
# Strategy: read one JSON object of environment variables from stdin (the store's key among them),
# put /dev/null on stdin, run ARGV with our environment plus those as a child, wait for it, and exit
# as it did: with its status, or, when a signal killed it, with one line in the log naming the
# signal (exit status 128 + the signal's number). The secrets are in the child's environment only:
# /proc/PID/environ of this process never holds them, as it would if they were passed like the rest
# of the environment (`setsid -w`, used before, needed them in its own).
#
# A standalone script with no imports beyond the standard library: it starts in milliseconds.
import json
import os
import signal
import sys

LINE = "kloset-blocks keeper: {what} was killed by {signal}"


def main() -> int:
    extra = json.loads(sys.stdin.buffer.read() or b"{}")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    argv = sys.argv[1:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvpe(argv[0], argv, {**os.environ, **extra})
        except OSError as e:
            print(f"kloset-blocks keeper: {argv[0]}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(127)
    del extra
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        print(LINE.format(what=os.path.basename(argv[0]), signal=name), file=sys.stderr, flush=True)
        return 128 + sig
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
