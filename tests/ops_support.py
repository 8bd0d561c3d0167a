"""Helpers for the operations tests: the HTTP API as JSON, and ``/metrics`` parsed by prometheus-client."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def http(url: str, method: str = "GET", auth: str | None = None, timeout: float = 20.0) -> tuple[int, Any, dict]:
    """(status, JSON body, headers) of a request; an error status is returned, not raised."""
    request = urllib.request.Request(url, method=method)
    if auth is not None:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            status, headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        body, status, headers = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(body), headers
    except ValueError:
        return status, body.decode(errors="replace"), headers


def get(url: str, **kwargs: Any) -> Any:
    """The JSON body of a GET that must succeed."""
    status, body, _ = http(url, **kwargs)
    assert status == 200, (url, status, body)
    return body


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed with prometheus-client's parser: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=20) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 if the series is absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def summed(samples: list[dict], name: str, **labels: str) -> float:
    """A sample summed over nodes."""
    return sum(metric(s, name, **labels) for s in samples)
