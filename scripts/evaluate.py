"""``python <pack>/scripts/evaluate.py DATA --checkpoint CKPT --out DIR [...]``: the evaluation
(``python -m invadapter_core.evaluate``) from any working directory, e.g. with an installed ComfyUI's python on a
pack in its custom_nodes folder."""
import sys
from pathlib import Path

# the pack's folder instead of this one, as `python -m` from the pack's folder has it (setting ComfyUI up puts ComfyUI
# before it, so ComfyUI's nodes module wins over the pack's nodes/ package)
sys.path[0] = str(Path(__file__).absolute().parents[1])  # not resolved: a symlinked pack is still "in custom_nodes"

from invadapter_core.evaluate.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
