import sys

from diffusets_jax.cli import main

sys.exit(main())
