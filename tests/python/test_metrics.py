# SPDX-License-Identifier: MIT OR Apache-2.0
"""`reapctl stats --prometheus` is valid Prometheus text, checked by the
reference parser (prometheus_client), with the counters and histograms a
scrape (node_exporter's textfile collector) expects."""
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN_DIR, Victim


def test_prometheus_text_parses_and_counts_a_kill(broker):
    reapctl = str(BIN_DIR / "reapctl")
    v = Victim()
    subprocess.run([reapctl, "--socket", broker.grpc, "kill", str(v.pid)], check=True, capture_output=True)
    v.close()
    text = subprocess.run(
        [reapctl, "--varlink", "--socket", broker.varlink, "stats", "--prometheus"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["reapd_kills"].type == "counter"
    kills = sum(s.value for s in families["reapd_kills"].samples if s.name == "reapd_kills_total")
    assert kills == 1
    hist = families["reapd_kill_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1
    assert all(a.value <= b.value for a, b in zip(buckets, buckets[1:])), "cumulative"
    assert families["reapd_connections_open"].type == "gauge"
