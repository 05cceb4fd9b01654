import sys

from triphase.cli import main

sys.exit(main())
