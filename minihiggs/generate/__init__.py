"""Generation (text -> speech) with upstream's decoding: `Engine` (static KV cache, per-row modes, batching),
`SamplingConfig` (processors, RAS, seeds), prompt building, and the `python -m minihiggs.generate` command.

    from minihiggs.generate import Engine, Request, SamplingConfig, tts_prompt
"""

from .engine import Engine, Generation, Request
from .prompt import Prompt, tts_prompt
from .sampling import SamplingConfig

__all__ = ["Engine", "Generation", "Prompt", "Request", "SamplingConfig", "tts_prompt"]
