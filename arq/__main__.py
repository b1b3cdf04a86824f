import sys

from arq.cli import main

sys.exit(main())
