"""`python -m fastnl.train`: the training command (fastnl/app/train.py)."""
import sys

from fastnl.app.train import main

if __name__ == "__main__":
    sys.exit(main())
