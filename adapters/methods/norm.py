"""norm (BN-adapt): normalise with the current batch's statistics, never update a parameter."""

from adapters.base import Adapter, BatchStatisticsOptions
from adapters.registry import register


@register
class Norm(Adapter):
    name = "norm"
    Options = BatchStatisticsOptions
    updates_parameters = False
