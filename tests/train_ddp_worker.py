"""One process of a multi-process CPU training run, started by torchrun from tests/test_train.py.

Usage: torchrun --standalone --nproc_per_node=2 tests/train_ddp_worker.py OUT_DIR SECTION.KEY=VALUE ...
Trains the in-process tiny SD1.5-shaped model (tests/support/models.py) with the trainer's own code path (rank and
world size from torchrun's environment, gloo) and writes OUT_DIR/rank<r>.safetensors (the adapter's state) and
OUT_DIR/rank<r>.json (the losses).
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from invadapter_core.comfyui.host import setup_comfy  # noqa: E402

setup_comfy()  # ComfyUI first on sys.path, CPU mode here: before anything imports comfy.model_management
sys.path.append(str(ROOT / "tests"))

from safetensors.torch import save_file  # noqa: E402

from invadapter_core.train.config import load_config  # noqa: E402
from invadapter_core.train.distributed import cleanup  # noqa: E402
from invadapter_core.train.loop import train  # noqa: E402
from support.models import tiny_sd15_model  # noqa: E402


def main(out: str, overrides: list[str]) -> None:
    rank = int(os.environ["RANK"])
    result = train(load_config(None, overrides), tiny_sd15_model(), progress=False)
    state = {k: v.detach().cpu().contiguous() for k, v in result.adapter.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": result.losses, "step": result.step,
                                                         "world_size": int(os.environ["WORLD_SIZE"])}))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
