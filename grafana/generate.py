#!/usr/bin/env python3
"""Writes the Grafana dashboards of kgs (grafana/dashboards/*.json).

Dashboards as code: edit the panel list here and re-run
`python3 grafana/generate.py` (`--check` only compares: the observability
test runs it, so the JSON cannot drift from this file). That test evaluates
every `expr` of every dashboard against a real Prometheus scraping the running
producer and app servers, so a metric renamed in code without the dashboard
fails `make test`.
"""
import json
import pathlib
import sys

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
OUT = pathlib.Path(__file__).resolve().parent / "dashboards"


def panel(pid, title, targets, unit="short", kind="timeseries", x=0, y=0, w=12, h=8, desc=""):
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid, title, panels, desc):
    # Lay panels out two per row.
    for i, p in enumerate(panels):
        p["gridPos"]["x"] = 0 if i % 2 == 0 else 12
        p["gridPos"]["y"] = (i // 2) * 8
    return {
        "uid": uid,
        "title": title,
        "description": desc,
        "tags": ["kgs"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "panels": panels,
    }


pool = dashboard("kgs-pool", "kgs / pool health", [
    panel(1, "Keys left in keys.<pool>", [("max by (pool) (kgs_producer_keys_in_pool)", "{{pool}}")],
          desc="Unused keys ready to be moved; the producer tops this up from the key space."),
    panel(2, "Key space used",
          [("max by (pool) (kgs_producer_keys_used) / max by (pool) (kgs_producer_key_space)", "{{pool}}"),
           ("max by (pool) (kgs_producer_space_used_ppm) / 1e6", "reported {{pool}}")],
          unit="percentunit", desc="used_keys / key space; 'reported' is the producer's own ppm gauge."),
    panel(3, "Burn rate (keys published per second)",
          [("sum by (pool) (rate(kgs_producer_keys_published_total[5m]))", "{{pool}}")], unit="ops"),
    panel(4, "Time to exhaustion of the key space",
          [("(max by (pool) (kgs_producer_key_space) - max by (pool) (kgs_producer_keys_used))"
            " / clamp_min(sum by (pool) (rate(kgs_producer_keys_published_total[15m])), 1e-9)", "{{pool}}")],
          unit="s", desc="Keys never handed out divided by the 15-minute burn rate."),
    panel(5, "Keys generated vs key space",
          [("max by (pool) (kgs_producer_keys_generated)", "generated {{pool}}"),
           ("max by (pool) (kgs_producer_key_space)", "space {{pool}}")]),
    panel(6, "Pool exhausted (every key used)", [("max by (pool) (kgs_producer_pool_exhausted)", "{{pool}}")],
          desc="1 once the leader finds nothing left to publish: app servers will run dry."),
    panel(7, "Key length in use (tier)", [("max by (pool) (kgs_producer_tier_length)", "{{pool}}")],
          kind="stat",
          desc="Length of the new keys handed out now. A pool of several lengths (init --max-length) "
               "hands out every key of a length before the next one."),
    panel(8, "Time to the next key length",
          [("max by (pool) (kgs_producer_tier_keys_left)"
            " / clamp_min(sum by (pool) (rate(kgs_producer_keys_published_total[15m])), 1e-9)", "{{pool}}")],
          unit="s", desc="Keys of the length in use not yet moved into batches, divided by the 15-minute "
                         "burn rate. In the longest tier: the time until the pool runs out."),
], "Is there enough key space left, and how fast is it burning? Which key length is in use?")

producer = dashboard("kgs-producer", "kgs / producer", [
    panel(1, "Leader (lease held)", [("kgs_producer_lease_leader", "{{instance}}")],
          desc="Exactly one producer per pool should show 1."),
    panel(2, "Lease epoch", [("max by (pool) (kgs_producer_lease_epoch)", "{{pool}}")]),
    panel(3, "Batches and keys published per second",
          [("sum by (pool) (rate(kgs_producer_batches_published_total[1m]))", "batches {{pool}}"),
           ("sum by (pool) (rate(kgs_producer_keys_published_total[1m]))", "keys {{pool}}")], unit="ops"),
    panel(4, "Move latency (p50, p99)",
          [("histogram_quantile(0.5, sum by (le) (rate(kgs_producer_move_seconds_bucket[5m])))", "p50"),
           ("histogram_quantile(0.99, sum by (le) (rate(kgs_producer_move_seconds_bucket[5m])))", "p99")], unit="s"),
    panel(5, "Publish latency (p50, p99)",
          [("histogram_quantile(0.5, sum by (le) (rate(kgs_producer_publish_seconds_bucket[5m])))", "p50"),
           ("histogram_quantile(0.99, sum by (le) (rate(kgs_producer_publish_seconds_bucket[5m])))", "p99")], unit="s"),
    panel(6, "Backlog per partition (batches)",
          [("max by (pool, partition) (kgs_producer_backlog_batches"
            " and on (instance) (kgs_producer_lease_leader == 1))", "{{pool}} p{{partition}}")],
          desc="As the leader sees it; a producer that stepped down keeps stale values."),
    panel(7, "Batches moved, recovered; keys returned by app servers",
          [("sum by (pool) (increase(kgs_producer_batches_moved_total[5m]))", "moved {{pool}}"),
           ("sum by (pool) (increase(kgs_producer_batches_recovered_total[5m]))", "recovered {{pool}}"),
           ("sum by (pool) (increase(kgs_producer_keys_returned_total[5m]))", "keys returned {{pool}}")]),
    panel(8, "Keys recycled, and recycle requests refused by reason",
          [("sum by (pool) (increase(kgs_producer_keys_recycled_total[5m]))", "recycled {{pool}}"),
           ("sum by (reason) (increase(kgs_producer_recycles_refused_total[5m]))", "refused: {{reason}}")]),
], "The active producer: leadership, publishing, latency, per-partition backlog.")

apps = dashboard("kgs-app-servers", "kgs / app servers", [
    panel(1, "Buffered keys per instance", [("kgs_consumer_buffered_keys", "{{instance}}")]),
    panel(2, "Keys buffered and handed out per second",
          [("sum by (instance) (rate(kgs_consumer_keys_handed_out_total[1m]))", "handed out {{instance}}"),
           ("sum by (instance) (rate(kgs_consumer_keys_buffered_total[1m]))", "buffered {{instance}}")], unit="ops",
          desc="Paired counters: over time, buffered minus handed out is the buffer depth plus keys returned."),
    panel(3, "Empty-buffer errors and waits per second",
          [("sum by (instance) (rate(kgs_consumer_empty_total[1m]))", "empty {{instance}}"),
           ("sum by (instance) (rate(kgs_consumer_waits_total[1m]))", "waits {{instance}}"),
           ("sum by (instance) (rate(kgs_consumer_wait_timeouts_total[1m]))", "timeouts {{instance}}")], unit="ops"),
    panel(4, "Claim + commit latency (p50, p99)",
          [("histogram_quantile(0.5, sum by (le) (rate(kgs_consumer_claim_commit_seconds_bucket[5m])))", "p50"),
           ("histogram_quantile(0.99, sum by (le) (rate(kgs_consumer_claim_commit_seconds_bucket[5m])))", "p99")], unit="s"),
    panel(5, "Batches claimed per second",
          [("sum by (instance) (rate(kgs_consumer_batches_claimed_total[1m]))", "{{instance}}")], unit="ops"),
    panel(6, "Keys returned at shutdown", [("sum by (instance) (kgs_consumer_keys_returned_total)", "{{instance}}")]),
    panel(7, "Assigned partitions and paused state",
          [("kgs_consumer_assigned_partitions", "assigned {{instance}}"), ("kgs_consumer_paused", "paused {{instance}}")]),
    panel(8, "Recycle requests, by outcome",
          [("sum by (outcome) (increase(kgs_consumer_recycle_requests_total[5m]))", "{{outcome}}")]),
], "Every app server embedding kgs-consumer: buffer depth, hand-out rate, waits, claim latency.")

errors = dashboard("kgs-errors", "kgs / errors and bad messages", [
    panel(1, "Bad messages skipped, by kind",
          [("sum by (kind) (increase(kgs_consumer_bad_messages_total[5m]))", "{{kind}}")]),
    panel(2, "Producer errors, by kind",
          [("sum by (kind) (increase(kgs_producer_errors_total[5m]))", "{{kind}}")]),
    panel(3, "Consumer commit failures and claim errors",
          [("sum by (instance) (increase(kgs_consumer_commit_failures_total[5m]))", "commit {{instance}}"),
           ("sum by (instance) (increase(kgs_consumer_claim_errors_total[5m]))", "claim {{instance}}")]),
    panel(4, "Rebalances, by event",
          [("sum by (event) (increase(kgs_consumer_rebalances_total[5m]))", "{{event}}")]),
    panel(5, "Replays (already claimed batches read again) and claims set aside",
          [("sum by (instance) (increase(kgs_consumer_replays_total[5m]))", "replays {{instance}}"),
           ("sum by (pool) (increase(kgs_producer_claims_rejected_total[5m]))", "claims set aside {{pool}}")]),
], "Everything that went wrong, by kind.")

# `--check`: write nothing, fail if a committed dashboard differs from this
# file's output (the observability test runs it, so the JSON cannot drift).
check = "--check" in sys.argv[1:]
stale = []
for name, d in [("pool", pool), ("producer", producer), ("app-servers", apps), ("errors", errors)]:
    path, text = OUT / f"kgs-{name}.json", json.dumps(d, indent=2) + "\n"
    if check:
        if not path.is_file() or path.read_text() != text:
            stale.append(str(path.relative_to(OUT.parent.parent)))
    else:
        path.write_text(text)
        print(f"wrote grafana/dashboards/kgs-{name}.json")
if stale:
    sys.exit(f"generate.py: out of date: {', '.join(stale)}; run python3 grafana/generate.py")
