# Read-only pyfuse3 views of a snapshot, for inspection and comparison (not the hot path: the NBD
# chain is). Two views over the same reader, planner and chunk cache as the nbdkit plugin:
#
#   image_file.ImageFileOps  `expose`: the synthesized ext4 image as ONE regular file. The FUSE
#                            filesystem is mounted on the file itself (its root inode is a regular
#                            file, as qemu-storage-daemon's FUSE export does), so FILE is the image.
#   tree.TreeOps             `browse`: the snapshot's files as a read-only directory tree.
#
# mount.py holds what both share: the mount options, the trio loop with clean unmount on
# SIGINT/SIGTERM/SIGHUP, --daemon, and the run-directory record that `kloset-blocks down` reads.
# chain.py plugs the exposed file into the attach chain (`mount --backend fuse`).
from __future__ import annotations
