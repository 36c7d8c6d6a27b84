import sys
from pathlib import Path

# Let the tests run from a source checkout without installing the plugin.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
