"""A vLLM-like backend simulator: real HTTP, OpenAI chat API, vLLM /metrics, continuous-batching timing.

Run one with `python -m bench.simulator --preset small --port 8201`, or in-process
with `running_simulator(EngineConfig.small())`.
"""

from bench.simulator.engine import Engine, EngineConfig, RequestTooLarge, Sequence
from bench.simulator.lengths import KnownLength, LengthBook, prompt_key
from bench.simulator.server import Simulator, count_prompt_tokens, running_simulator

__all__ = [
    "Engine",
    "EngineConfig",
    "KnownLength",
    "LengthBook",
    "RequestTooLarge",
    "Sequence",
    "Simulator",
    "count_prompt_tokens",
    "prompt_key",
    "running_simulator",
]
