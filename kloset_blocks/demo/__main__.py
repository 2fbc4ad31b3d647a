import sys

from kloset_blocks.demo.run import main

sys.exit(main())
