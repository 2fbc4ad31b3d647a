# Serving a block image over NBD: the decoded-chunk cache (chunks.py) and its on-disk tier
# (diskcache.py), the export server behind the nbdkit plugin (server.py), and the nbdkit command line
# that runs it (nbdkit.py).
