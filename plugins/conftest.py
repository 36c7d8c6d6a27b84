import sys
from pathlib import Path

# Let the plugins' tests run from a source checkout without installing the plugins.
for _root in sorted(Path(__file__).resolve().parent.glob("diffulex-*")):
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))
