# The host side of a chain: run directories and their records (rundir.py), processes (procs.py),
# signals (signals.py), progress lines (progress.py), tools (tools.py), mounts and loop devices
# (mounts.py), the attach chain itself (chain.py) and its teardown (teardown.py). Nothing here knows
# about Postgres or the CLI: the layers above register what they start for teardown.
