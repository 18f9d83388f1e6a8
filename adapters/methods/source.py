"""source: the frozen model in eval mode with its running statistics (the no-adaptation baseline)."""

from adapters.base import Adapter
from adapters.registry import register


@register
class Source(Adapter):
    name = "source"
    uses_batch_statistics = False
    updates_parameters = False
