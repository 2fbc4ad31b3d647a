# What the commands do, as a library: open a store and check a snapshot before anything starts
# (check.py), bring up sessions (sessions.py: mount, Postgres, psql), and run a statement across
# snapshots (query.py, shown by report.py).
