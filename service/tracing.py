"""OpenTelemetry spans along one request's path: decode, queue wait, batch forward, adaptation step, encode.

Optional. With the OpenTelemetry API installed (``pip install 'tta-serve[otel]'`` brings the SDK), spans
go to whatever tracer provider the operator configured (an OTLP exporter, say); without it every call
here is a no-op. A request's spans form one trace: the route opens the request span; the model thread,
which serves many requests per batch, records each request's wait in the queue under that request's span
and runs the batch (and its adaptation step) under the first request's, linked to all the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # the otel extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]

TRACER_NAME = "tta-serve"


def enabled() -> bool:
    """Whether spans go anywhere: OpenTelemetry installed *and* a tracer provider configured. Until the
    operator configures one the API's proxy provider records nothing, so every call here returns at once
    instead of building spans nobody reads (the request path is measured in microseconds)."""
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def current_context() -> Any:
    """The caller's trace context, to hand to work done later on another thread (None when tracing is off)."""
    return otel_context.get_current() if enabled() else None


@contextmanager
def span(name: str, attributes: dict[str, Any] | None = None, parent: Any = None,
         linked: Sequence[Any] = ()) -> Iterator[Any]:
    """A span around the block: a child of ``parent`` (a context from :func:`current_context`), else of the
    current span; ``linked`` contexts become links (the other requests of a batch)."""
    if not enabled():
        yield None
        return
    links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in linked if c is not None]
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, context=parent, links=links, attributes=attributes) as current:
        yield current


def record_span(name: str, parent: Any, start_ns: int, end_ns: int | None = None,
                attributes: dict[str, Any] | None = None) -> None:
    """A span that already happened (a wait in the queue), from ``start_ns`` (``time.time_ns()``) to now."""
    if not enabled():
        return
    tracer = trace.get_tracer(TRACER_NAME)
    done = tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    done.end(end_time=end_ns or time.time_ns())
