import sys

from sublearn.cli import main

sys.exit(main())
