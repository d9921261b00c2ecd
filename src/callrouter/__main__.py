import sys

from callrouter.cli import main

sys.exit(main())
