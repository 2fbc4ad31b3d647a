# The block image: an ext4 plan (kloset_blocks.ext4) served from its regions (block.py), built from a
# snapshot (snapshot.py) or a local directory tree (localtree.py). Metadata only: file data is read
# through each file's FileData when a region is read.
