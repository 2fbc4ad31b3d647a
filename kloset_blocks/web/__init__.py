# `kloset-blocks ui`: SQL on any backup from a web page.
#
# Strategy: one process holds the store open (the passphrase asked once, the key derived once) and
# serves a page and a JSON API on loopback (app.py: FastAPI on uvicorn). Each opened snapshot is the
# CLI's own chain and Postgres (sessions.py: app sessions' pg_session, read-only), brought up in a
# thread while the page polls its phases; statements reach that Postgres over its private Unix socket
# with psycopg (db.py), each on a fresh connection inside a READ ONLY transaction whose
# statement_timeout we set with SET LOCAL, and as one statement only (the extended protocol), so the
# page can neither leave the transaction nor lift the timeout. Across-backups is the query engine
# (across.py: QueryRun, one shared nbdkit) with the same statement runner.
#
# Invariants: every chain started is torn down when the server stops (Ctrl-C, SIGTERM, an idle
# timeout, or --max-open pushing out the oldest idle one); results reach disk only as a download;
# whatever a backup holds is shown as text (the page never interprets it as HTML).
