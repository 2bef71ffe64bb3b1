"""The request pipeline, one stage per module in request order; `run.Pipeline` wires them."""

from icgate.gateway.pipeline.run import Pipeline, PipelineResult
from icgate.gateway.pipeline.stream import StreamRelay

__all__ = ["Pipeline", "PipelineResult", "StreamRelay"]
