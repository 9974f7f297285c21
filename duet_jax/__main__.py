import sys

from duet_jax.cli import main

sys.exit(main())
