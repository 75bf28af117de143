#!/usr/bin/env python3
"""Prints the cross-shard cost summary table from cross-shard-SUFFIX-<shape>.json reports.
   cross-shard-summary.py DIR SUFFIX"""
import json, sys, os
d, suffix = sys.argv[1], sys.argv[2]
shapes = [("100x10hz", "1 room × 100 members × 10 msg/s"),
          ("200x2.5hz", "1 room × 200 × 2.5 msg/s"),
          ("400x0.625hz", "1 room × 400 × 0.625 msg/s"),
          ("100rooms-10x1hz", "100 rooms × 10 × 1 msg/s"),
          ("100x10hz-1node", "1 room × 100 × 10 msg/s, 1 node")]
def f(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}"
def ms(us):
    return f"{us/1000:.2f}"
print("| shape | nodes (local / bridged members) | room messages / deliveries | Redis PUBLISH per room message | Redis bytes out per delivery | all-server CPU-s per 100k deliveries (router share) | local e2e p50 / p99 (ms) | bridged e2e p50 / p99 (ms) | lost |")
print("|---|---|---|---|---|---|---|---|---|")
for key, label in shapes:
    p = os.path.join(d, f"cross-shard-{suffix}-{key}.json")
    if not os.path.exists(p):
        continue
    j = json.load(open(p))
    fo = j["fanout"]; c = fo["cluster_cost"]; r = c.get("redis") or {}
    nodes = len((c.get("bus") or {}).get("nodes", [])) or "?"
    lo, br = j["local"], j["bridged"]
    share = c.get("router_share")
    cpu = f(c.get("all_servers_cpu_s_per_100k_deliveries")) + (f" ({share*100:.0f}%)" if share is not None else "")
    bl = "—" if br["members"] == 0 else f"{ms(br['e2e_latency_us']['p50'])} / {ms(br['e2e_latency_us']['p99'])}"
    print(f"| {label} | {nodes} ({lo['members']} / {br['members']}) | {c['room_messages']} / {c['deliveries']} | "
          f"{f(r.get('publish_per_room_message'), 1)} | {f(r.get('output_bytes_per_delivery'), 0)} | {cpu} | "
          f"{ms(lo['e2e_latency_us']['p50'])} / {ms(lo['e2e_latency_us']['p99'])} | {bl} | {fo['messages']['lost']} |")
