"""Prints the JSON lines benches/write_client.rs writes as one line of text each.

    write_client ... | python3 benches/common/latency.py [STREAM]

With STREAM (writes or checks), only that stream's line.
"""
import json
import sys

only = sys.argv[1] if len(sys.argv) > 1 else None
for line in sys.stdin:
    r = json.loads(line)
    if only and r["stream"] != only:
        continue
    print(
        f"{r['stream']}: {r['ok']} ok, {r['errors']} errors at {r['rate']:.0f}/s: "
        f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, p99.9 {r['p999_ms']} ms, "
        f"max {r['max_ms']} ms (each from when it was due)"
    )
