import sys

from soupkern.cli import main

sys.exit(main())
