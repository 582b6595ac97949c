import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Parity numbers are measured single-threaded, like the golden oracle; it also keeps the
# 2-core CI machine responsive while the Cog server tests run subprocesses.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mla_pipeline():
    from deepseek_vl2_runtime import Pipeline

    from checkpoints import MLA_MODEL

    return Pipeline.load(MLA_MODEL, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def predictor():
    """The Cog Predictor, set up in-process on the tiny checkpoint."""
    from predict import Predictor

    from paths import tiny_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPSEEK_VL2_WEIGHTS", str(tiny_checkpoint()))
        p = Predictor()
        p.setup()
    return p
