"""Our own PyTorch runtime for DeepSeek-VL2 (tiny / small / base).

    from deepseek_vl2_runtime import Pipeline, SamplingParams
    pipe = Pipeline.load("weights/")                       # bf16 on CUDA, float32 on CPU
    for chunk in pipe.stream("<image>\\nDescribe this.", [image], SamplingParams(seed=0)):
        print(chunk, end="")

No side effects on import.
"""

from .config import VL2Config
from .errors import CheckpointError, InputError
from .pipeline import EncodedRequest, Pipeline, TextStream
from .sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "EncodedRequest",
    "InputError",
    "Pipeline",
    "SamplingParams",
    "TextStream",
    "VL2Config",
]
