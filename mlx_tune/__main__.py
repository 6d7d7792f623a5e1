import sys

from mlx_tune.cli import main

sys.exit(main())
