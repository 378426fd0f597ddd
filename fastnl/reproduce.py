"""`python -m fastnl.reproduce`: the Table 1 reproduction command (fastnl/app/reproduce.py)."""
import sys

from fastnl.app.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
