import sys

from eval.accuracy.cli import main

sys.exit(main())
