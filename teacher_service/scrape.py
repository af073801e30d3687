"""Reading the service's /metrics (Prometheus text format) from the client side, with prometheus_client's parser.

The service writes these metrics (teacher_service/metrics.py); the demo, the benchmarks and the tests read them back.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def labelled(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (e.g. "akd_rows_total")."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of every sample called `name` whose labels include `labels`."""
    return [value for found, value in labelled(text, name) if labels.items() <= found.items()]


def total(text: str, name: str, **labels: str) -> float:
    """The sum over the matching samples (a counter summed over teachers); 0 when there are none."""
    return sum(samples(text, name, **labels))


def largest(text: str, name: str, **labels: str) -> float:
    """The largest matching sample (a per-teacher maximum's overall one); 0 when there are none."""
    return max(samples(text, name, **labels), default=0.0)
