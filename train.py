"""``python -m train`` at the root of a clone: the same as ``smollm train`` / ``python -m smollm_stack.train``.

Only a clone has this file; the installed distribution owns no top-level name but ``smollm_stack``.
"""

import sys

from smollm_stack.train.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
