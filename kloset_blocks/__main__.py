import sys

from kloset_blocks.cli import main

sys.exit(main())
