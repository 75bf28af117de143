#!/usr/bin/env bash
# Validates the deployment files without Docker or Kubernetes:
#   - promtool (Debian's `prometheus` package, installed if missing; its service is not
#     started): scrape configs, alert rules, and the alert unit tests;
#   - compose.yml, Kubernetes manifests, Grafana provisioning: parsed with PyYAML and checked
#     for the structure this cluster needs (ids, advertise names, probes, grace periods...);
#   - the Grafana dashboard: valid JSON (python3 -m json.tool) and well-formed panels;
#   - every chat_* metric named in alerts.yml and the dashboard exists in common/src/metrics.rs,
#     every metric of metrics.rs is described in deploy/OPERATIONS.md,
#     and every alert links to its own section (### AlertName) of deploy/OPERATIONS.md.
# Exit status: 0 when everything passed, 1 otherwise.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
deploy=deploy
logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT

summary=()
failed=0
n=0

# step NAME CMD...: runs CMD, records PASS/FAIL, prints CMD's output on failure.
step() {
  local name=$1; shift
  n=$((n + 1))
  local log=$logdir/$n.log
  if "$@" >"$log" 2>&1; then
    summary+=("PASS  $name")
  else
    summary+=("FAIL  $name")
    failed=1
    echo "---- FAIL: $name" >&2
    sed 's/^/    /' "$log" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# promtool
# ---------------------------------------------------------------------------------------------
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "promtool missing and not root (no sudo)"; return 1; }
    sudo=(sudo)
  fi
  echo "promtool not found: installing Debian's prometheus package (service not started)"
  # Keep the package's postinst from starting the prometheus service: policy-rc.d exit 101
  # forbids service starts through invoke-rc.d/deb-systemd-invoke. Only ours is removed.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo[@]}" chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
  if [ "$rc" -eq 0 ]; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends prometheus || rc=$?
  fi
  [ "$made_policy" -eq 1 ] && "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] && command -v promtool >/dev/null 2>&1
}

step "promtool available ($(command -v promtool || echo 'to install'))" ensure_promtool
if command -v promtool >/dev/null 2>&1; then
  summary[${#summary[@]}-1]="PASS  promtool available: $(promtool --version 2>&1 | head -n1)"
  for cfg in prometheus.yml local.yml; do
    step "promtool check config $deploy/prometheus/$cfg" promtool check config "$deploy/prometheus/$cfg"
  done
  # Debian builds Prometheus without Kubernetes service discovery, so its promtool rejects
  # kubernetes_sd_configs. Then check a copy of k8s.yml with static targets in their place:
  # everything else (relabeling, rule files) is still validated.
  check_k8s_config() {
    local out
    if out=$(promtool check config "$deploy/prometheus/k8s.yml" 2>&1); then
      echo "$out"; return 0
    fi
    echo "$out"
    grep -q 'field kubernetes_sd_configs not found' <<<"$out" || return 1
    echo "promtool lacks kubernetes_sd_configs (Debian build): checking k8s.yml with static targets instead"
    local tmp=$logdir/k8s-prom
    mkdir -p "$tmp" && cp "$deploy/prometheus/alerts.yml" "$tmp/" || return 1
    python3 - "$deploy/prometheus/k8s.yml" "$tmp/k8s.yml" <<'PY' || return 1
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
for sc in cfg["scrape_configs"]:
    if sc.pop("kubernetes_sd_configs", None) is not None:
        sc["static_configs"] = [{"targets": ["placeholder.invalid:7001"]}]
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
PY
    promtool check config "$tmp/k8s.yml"
  }
  step "promtool check config $deploy/prometheus/k8s.yml" check_k8s_config
  if grep -qs 'promtool lacks kubernetes_sd_configs' "$logdir/$n.log"; then
    summary[${#summary[@]}-1]+=" (kubernetes_sd_configs swapped for static targets: Debian's promtool has no Kubernetes SD)"
  fi
  step "promtool check rules $deploy/prometheus/alerts.yml" promtool check rules "$deploy/prometheus/alerts.yml"
  step "promtool test rules $deploy/prometheus/alerts_test.yml" \
    bash -c "cd '$deploy/prometheus' && promtool test rules alerts_test.yml"
else
  summary+=("FAIL  promtool checks skipped: no promtool")
  failed=1
fi

# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
step "python3 -m json.tool $deploy/grafana/dashboards/chat.json" \
  bash -c "python3 -m json.tool '$deploy/grafana/dashboards/chat.json' >/dev/null"

# ---------------------------------------------------------------------------------------------
# YAML structure and cross-checks (PyYAML)
# ---------------------------------------------------------------------------------------------
ensure_pyyaml() {
  python3 -c 'import yaml' 2>/dev/null && return 0
  echo "PyYAML missing: pip install pyyaml"
  python3 -m pip install --quiet pyyaml && python3 -c 'import yaml'
}
step "PyYAML available" ensure_pyyaml

structure_check() {
  python3 - "$repo" <<'PY'
import glob, json, os, re, sys
import yaml

repo = sys.argv[1]
D = os.path.join(repo, "deploy")
errors = []
oks = []

def ok(msg): oks.append(msg)
def err(msg): errors.append(msg)
def check(cond, msg):
    (ok if cond else err)(msg)
    return cond

def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

def dur(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(s).strip())
    if not m:
        raise ValueError(f"bad duration {s!r}")
    v, u = int(m.group(1)), m.group(2) or "s"
    return v * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]

# --- metric names -----------------------------------------------------------------------------
src = open(os.path.join(repo, "common/src/metrics.rs")).read()
defined = set(re.findall(r'pub const [A-Z0-9_]+: &str = "([a-z0-9_]+)";', src))
check(len(defined) >= 30, f"metrics.rs defines {len(defined)} metric names")
histograms = {m for m in defined if m.endswith("_seconds") or m.endswith("_ratio")}
# Histograms whose unit is a count (buckets set by name in node/src/telemetry.rs).
histograms |= {"chat_node_bus_batch_items"}
# metrics-process exports these (deploy/OPERATIONS.md "Metrics").
process = {"process_cpu_seconds_total", "process_resident_memory_bytes",
           "process_virtual_memory_bytes", "process_virtual_memory_max_bytes",
           "process_open_fds", "process_max_fds", "process_threads",
           "process_start_time_seconds"}

def referenced(text):
    return set(re.findall(r"\b((?:chat|process)_[a-z0-9_]+)\b", text))

def check_names(where, names):
    bad = []
    for n in sorted(names):
        if n.startswith("process_"):
            if n not in process: bad.append(n)
            continue
        if n in histograms:
            bad.append(n + " (a histogram: use _bucket, _sum or _count)")
            continue
        if n in defined:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", n)
        if base != n and base in histograms:
            continue
        bad.append(n)
    check(not bad, f"{where}: {len(names)} metric names all exist" + (f"; unknown: {bad}" if bad else ""))

def base_names(names):
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}

# --- OPERATIONS.md anchors ---------------------------------------------------------------------
ops = open(os.path.join(D, "OPERATIONS.md")).read()
def slug(h):
    h = h.strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")
anchors = {slug(m) for m in re.findall(r"^#{1,6}\s+(.+)$", ops, re.M)}

undocumented = sorted(n for n in defined if f"`{n}`" not in ops)
check(not undocumented, "every metric of common/src/metrics.rs is described in OPERATIONS.md" + (f"; missing {undocumented}" if undocumented else ""))

# --- alerts.yml ------------------------------------------------------------------------------
alerts_path = os.path.join(D, "prometheus/alerts.yml")
alerts = yaml.safe_load(open(alerts_path))
rules = [r for g in alerts["groups"] for r in g["rules"] if "alert" in r]
check(len(rules) >= 10, f"alerts.yml has {len(rules)} alerts")
for r in rules:
    ann = r.get("annotations", {})
    check("summary" in ann and "runbook" in ann, f"alert {r['alert']} has summary and runbook")
    rb = ann.get("runbook", "")
    m = re.fullmatch(r"OPERATIONS\.md#([a-z0-9\-_]+)", rb)
    check(bool(m) and m.group(1) in anchors, f"alert {r['alert']} runbook {rb!r} is a section of OPERATIONS.md")
    check(bool(m) and m.group(1) == r["alert"].lower(), f"alert {r['alert']} has its own section (### {r['alert']}) in OPERATIONS.md \"Alerts\"")
    check(r.get("labels", {}).get("severity") in ("warning", "critical"), f"alert {r['alert']} has a severity")
alert_text = "\n".join(r["expr"] for r in rules)
check_names("alerts.yml", referenced(alert_text))
required_alert_metrics = {
    "chat_node_slow_consumer_disconnects_total", "chat_node_outbound_queue_fill_ratio",
    "chat_node_room_inbox_full_total", "chat_node_store_errors_total", "chat_node_ack_seconds",
    "chat_node_bus_up", "chat_node_bus_reconnects_total", "chat_router_ring_changes_total",
    "chat_node_ready", "chat_router_upstream_errors_total"}
missing = required_alert_metrics - base_names(referenced(alert_text))
check(not missing, "alerts cover slow consumers, queue saturation, store errors, ack latency, bus, ring flapping, readiness, upstream errors" + (f"; missing {sorted(missing)}" if missing else ""))
check("chat_node_ready == 0" in alert_text and any(r["expr"].strip() == "chat_node_ready == 0" and r.get("for") == "2m" for r in rules),
      "a node not ready alert: chat_node_ready == 0 for 2m")

# --- dashboard -------------------------------------------------------------------------------
dash = json.load(open(os.path.join(D, "grafana/dashboards/chat.json")))
panels = dash.get("panels", [])
ids = [p.get("id") for p in panels]
check(len(ids) == len(set(ids)), "dashboard panel ids are unique")
exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
check(dash.get("uid") and dash.get("title") and len(exprs) >= 30, f"dashboard has uid, title and {len(exprs)} queries")
for p in panels:
    if p.get("type") != "row":
        check(p.get("targets") and "gridPos" in p, f"panel {p.get('title')!r} has queries and a position")
dash_text = "\n".join(exprs) + "\n" + json.dumps(dash.get("templating", {}))
check_names("dashboard", referenced(dash_text))
required_dash = {
    "chat_node_connections", "chat_node_rooms_active", "chat_node_messages_delivered_total",
    "chat_node_fanout_seconds", "chat_node_ack_seconds", "chat_node_outbound_queue_fill_ratio",
    "chat_node_slow_consumer_disconnects_total", "chat_node_store_errors_total", "chat_node_bus_up",
    "chat_router_ring_nodes", "chat_router_http_requests_total", "chat_router_proxied_bytes_total",
    "process_cpu_seconds_total", "process_resident_memory_bytes"}
missing = required_dash - base_names(referenced(dash_text))
check(not missing, "dashboard covers connections, rooms, deliveries, fan-out/ack latency, queues, slow consumers, store, bus, ring, router traffic, CPU, RSS" + (f"; missing {sorted(missing)}" if missing else ""))

# --- Prometheus scrape configs ------------------------------------------------------------------
def static_targets(path):
    cfg = yaml.safe_load(open(path))
    out = {}
    for sc in cfg["scrape_configs"]:
        out[sc["job_name"]] = [t for s in sc.get("static_configs", []) for t in s["targets"]]
    return cfg, out
_, local = static_targets(os.path.join(D, "prometheus/local.yml"))
check(local.get("chat-router") == ["127.0.0.1:7000"] and
      sorted(local.get("chat-node", [])) == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"],
      "local.yml scrapes the router on 127.0.0.1:7000 and nodes on 7001-7003")
for name in ("prometheus.yml", "local.yml", "k8s.yml"):
    cfg = yaml.safe_load(open(os.path.join(D, "prometheus", name)))
    jobs = {sc["job_name"] for sc in cfg["scrape_configs"]}
    check({"chat-node", "chat-router"} <= jobs, f"{name} has jobs chat-node and chat-router")
    check(cfg.get("rule_files") == ["alerts.yml"], f"{name} loads alerts.yml")

# --- Containerfile --------------------------------------------------------------------------------
cf = open(os.path.join(D, "Containerfile")).read()
stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", cf, re.M | re.I))
check({"builder", "node", "router"} <= stages, f"Containerfile stages {sorted(stages)} include builder, node, router")
check(re.search(r"cargo build --release .*-p chat-node -p chat-router", cf) is not None, "Containerfile builds chat-node and chat-router in release")
users = re.findall(r"^USER\s+(\S+)", cf, re.M)
check(users and all(u.split(":")[0] not in ("0", "root") for u in users), f"Containerfile runs as non-root ({users})")
check("EXPOSE 7000" in cf and "EXPOSE 7001" in cf, "Containerfile exposes 7000 and 7001")
check('ENTRYPOINT ["/usr/local/bin/chat-node"]' in cf and 'ENTRYPOINT ["/usr/local/bin/chat-router"]' in cf, "Containerfile has an ENTRYPOINT per binary")
check(re.search(r"^FROM\s+\S*debian\S*slim", cf, re.M | re.I) is not None or "bookworm-slim" in cf, "runtime is debian-slim")
for path in re.findall(r"^COPY\s+(?!--from)(\S+)\s", cf, re.M):
    check(os.path.exists(os.path.join(repo, path)), f"Containerfile COPY source {path} exists")

# --- compose.yml ----------------------------------------------------------------------------------
compose = yaml.safe_load(open(os.path.join(D, "compose.yml")))
svcs = compose.get("services", {})
want = {"scylla", "redis", "node1", "node2", "node3", "router1", "router2", "lb", "prometheus", "grafana"}
check(want <= set(svcs), f"compose services include {sorted(want)}")
check("scylladb/scylla" in svcs.get("scylla", {}).get("image", ""), "compose uses scylladb/scylla")
node_ids = []
for i in (1, 2, 3):
    s = svcs.get(f"node{i}", {})
    env = s.get("environment", {})
    node_ids.append(env.get("CHAT_NODE_ID"))
    check(env.get("CHAT_ADVERTISE") == f"node{i}:7001", f"node{i} advertises node{i}:7001")
    check(env.get("CHAT_REDIS_URL", "").startswith("redis://redis:") and env.get("CHAT_CQL_NODES", "").startswith("scylla:"), f"node{i} points at redis and scylla")
    check(dur(s.get("stop_grace_period", "10s")) > dur(env.get("CHAT_SHUTDOWN_GRACE", "20s")), f"node{i} stop_grace_period exceeds its shutdown grace")
    check(s.get("build", {}).get("target") == "node", f"node{i} builds the node target")
check(node_ids == ["1", "2", "3"], f"compose node ids {node_ids} are 1-3")
for r in ("router1", "router2"):
    s = svcs.get(r, {})
    env = s.get("environment", {})
    check(s.get("build", {}).get("target") == "router", f"{r} builds the router target")
    check(env.get("CHAT_LISTEN") == "0.0.0.0:7000", f"{r} listens on 0.0.0.0:7000")
    check(dur(s.get("stop_grace_period", "10s")) > dur(env.get("CHAT_SHUTDOWN_GRACE", "10s")), f"{r} stop_grace_period exceeds its shutdown grace")
for name, s in svcs.items():
    b = s.get("build")
    if b:
        ctx = os.path.normpath(os.path.join(D, b["context"]))
        df = os.path.join(ctx, b["dockerfile"])
        check(os.path.isfile(df), f"{name}: build file {os.path.relpath(df, repo)} exists")
        check(b.get("target") in stages, f"{name}: target {b.get('target')} is a Containerfile stage")
    for v in s.get("volumes", []):
        src_ = v.split(":")[0]
        if src_.startswith("."):
            check(os.path.exists(os.path.join(D, src_)), f"{name}: mounted {src_} exists")
    for dep in (s.get("depends_on") or {}):
        check(dep in svcs, f"{name} depends on existing service {dep}")
nginx = open(os.path.join(D, "compose/nginx.conf")).read()
check("router1:7000" in nginx and "router2:7000" in nginx and "Upgrade" in nginx, "nginx.conf balances router1/router2 and passes WebSocket upgrades")
_, ctargets = static_targets(os.path.join(D, "prometheus/prometheus.yml"))
for job in ("chat-node", "chat-router"):
    hosts = [t.rsplit(":", 1)[0] for t in ctargets.get(job, [])]
    check(hosts and all(h in svcs for h in hosts), f"prometheus.yml {job} targets {hosts} are compose services")
# Grafana provisioning
ds = yaml.safe_load(open(os.path.join(D, "grafana/provisioning/datasources/prometheus.yml")))
check(ds["datasources"][0]["type"] == "prometheus" and "prometheus:9090" in ds["datasources"][0]["url"], "Grafana datasource points at prometheus:9090")
prov = yaml.safe_load(open(os.path.join(D, "grafana/provisioning/dashboards/chat.yml")))
dpath = prov["providers"][0]["options"]["path"]
mounts = [v.split(":")[1] for v in svcs["grafana"]["volumes"] if v.startswith("./grafana/dashboards:")]
check(mounts == [dpath], f"Grafana dashboard provider path {dpath} is where compose mounts deploy/grafana/dashboards")

# --- Kubernetes ---------------------------------------------------------------------------------
K = os.path.join(D, "k8s")
kust = yaml.safe_load(open(os.path.join(K, "kustomization.yaml")))
docs = []
for res in kust["resources"]:
    p = os.path.join(K, res)
    if check(os.path.isfile(p), f"kustomization resource {res} exists"):
        docs += load_all(p)
for p in sorted(glob.glob(os.path.join(K, "*.yaml"))):
    for d in load_all(p):
        check(all(k in d for k in ("apiVersion", "kind")), f"{os.path.basename(p)}: {d.get('kind')} has apiVersion and kind")
        if d["kind"] != "Kustomization":
            check(d.get("metadata", {}).get("name"), f"{os.path.basename(p)}: {d['kind']} has metadata.name")
by = {}
for d in docs:
    by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
cms = by.get("ConfigMap", {})
env_cm = cms.get("chat-env", {}).get("data", {})
check("NetworkTopologyStrategy" in env_cm.get("CHAT_CQL_REPLICATION", ""), "ConfigMap: NetworkTopologyStrategy replication")
check(env_cm.get("CHAT_CQL_CONSISTENCY") == "local-quorum", "ConfigMap: local-quorum consistency")
check(env_cm.get("CHAT_REDIS_URL", "").startswith("redis://") and env_cm.get("CHAT_CQL_NODES"), "ConfigMap: Redis URL and CQL nodes")
check(all(isinstance(v, str) for v in env_cm.values()), "ConfigMap values are strings")

def labels_match(sel, labels):
    return all(labels.get(k) == v for k, v in sel.items())

def workload(kind, name, port, grace_default):
    w = by.get(kind, {}).get(name)
    if not check(w is not None, f"{kind} {name} exists"):
        return None
    spec = w["spec"]
    tpl = spec["template"]
    sel = spec["selector"]["matchLabels"]
    check(labels_match(sel, tpl["metadata"]["labels"]), f"{kind} {name}: selector matches pod labels")
    pod = tpl["spec"]
    c = pod["containers"][0]
    check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{name}: readiness probe on /readyz")
    check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", f"{name}: liveness probe on /healthz")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("http") == port, f"{name}: container port http = {port}")
    res = c.get("resources", {})
    check(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), f"{name}: resource requests and limits")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else None
    check(sleep is not None and 0 < sleep <= 15, f"{name}: preStop sleeps {sleep}s")
    envs = {e["name"]: e.get("value") for e in c.get("env", [])}
    args = " ".join(c.get("args", []))
    m = re.search(r"--shutdown-grace[ =](\S+)", args)
    grace = dur(m.group(1)) if m else dur(envs.get("CHAT_SHUTDOWN_GRACE") or grace_default)
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    check(tgp > grace + (sleep or 0), f"{name}: terminationGracePeriodSeconds {tgp} > shutdown grace {grace:g}s + preStop {sleep}s")
    for ef in c.get("envFrom", []):
        if "configMapRef" in ef:
            check(ef["configMapRef"]["name"] in cms, f"{name}: envFrom ConfigMap {ef['configMapRef']['name']} exists")
    sc = pod.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{name}: runs as non-root")
    for pdb in by.get("PodDisruptionBudget", {}).values():
        if labels_match(pdb["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"]):
            break
    else:
        err(f"{name}: no PodDisruptionBudget selects it")
        return w
    ok(f"{name}: PodDisruptionBudget {pdb['metadata']['name']} selects it")
    return w

sts = workload("StatefulSet", "chat-node", 7001, "20s")
if sts:
    svc = by.get("Service", {}).get(sts["spec"]["serviceName"])
    check(svc is not None and svc["spec"].get("clusterIP") == "None", "StatefulSet serviceName is a headless Service")
    check(svc is not None and labels_match(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"]), "headless Service selects the node pods")
    script = " ".join(sts["spec"]["template"]["spec"]["containers"][0].get("args", []))
    check("${HOSTNAME##*-}" in script and "CHAT_NODE_ID" in script, "node id comes from the pod ordinal (${HOSTNAME##*-})")
    check("CHAT_ADVERTISE" in script and ".chat-node." in script, "node advertises its headless-Service DNS name")
dep = workload("Deployment", "chat-router", 7000, "10s")
if dep:
    svc = by.get("Service", {}).get("chat-router")
    check(svc is not None and labels_match(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]), "router Service selects the router pods")
    check(dep["spec"].get("replicas", 1) >= 2, "at least two routers")

for m in oks:
    print("ok:", m)
for m in errors:
    print("FAIL:", m)
print(f"structure checks: {len(oks)} passed, {len(errors)} failed")
sys.exit(1 if errors else 0)
PY
}
if python3 -c 'import yaml' 2>/dev/null; then
  step "compose, Kubernetes, Containerfile, Grafana, scrape config structure; metric names vs common/src/metrics.rs; runbook anchors" structure_check
  # Keep the count of structure checks for the summary.
  if [ -f "$logdir/$n.log" ]; then
    summary[${#summary[@]}-1]+=" ($(tail -n1 "$logdir/$n.log"))"
  fi
fi

# The script itself must never touch system services.
step "check.sh does not call systemctl" bash -c "! grep -v '^[[:space:]]*#' '$deploy/check.sh' | grep -v 'check.sh does not call' | grep -qw systemctl"

echo
echo "deploy/check.sh summary:"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "deploy/check.sh: FAILED"
  exit 1
fi
echo "deploy/check.sh: all checks passed"
