"""`python -m fastnl.spectrum`: runs the spectrum tool's command (fastnl/app/spectrum/__main__.py)."""
import sys

from fastnl.app.spectrum.__main__ import main

sys.exit(main())
