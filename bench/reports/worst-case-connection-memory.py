"""Worst case bytes a node holds per connection: N clients each join R rooms with since=0
(R rooms of M stored messages of B-byte bodies) and never read. Prints the node's RSS growth.

    python3 bench/reports/worst-case-connection-memory.py target/debug/chat-node 7301 20 64 600 4000 \
        --write-timeout 120s [--outbound-queue-bytes N]

Starts its own chat-node (memory store, dev auth) on PORT, fills the rooms over HTTP, then
opens the connections (4 KiB receive buffers, never read) and samples the node's RSS for
10 s. `--write-timeout 120s` keeps the stalled clients from being dropped while it samples.
"""
import http.client, json, os, socket, struct, sys, time, subprocess

BIN, PORT = sys.argv[1], int(sys.argv[2])
N, R, M, B = (int(x) for x in sys.argv[3:7])
extra = sys.argv[7:]
node = subprocess.Popen([BIN, "--listen", f"127.0.0.1:{PORT}", "--store", "memory", "--presence", "false",
                         "--insecure-dev-auth", "--node-id", "9", *extra],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if not k.startswith("CHAT_")})
def rss():
    for line in open(f"/proc/{node.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
try:
    for _ in range(100):
        try:
            c = http.client.HTTPConnection("127.0.0.1", PORT); c.request("GET", "/healthz"); c.getresponse().read(); break
        except OSError:
            time.sleep(0.1)
    body = "x" * B
    c = http.client.HTTPConnection("127.0.0.1", PORT)
    for r in range(R):
        for i in range(M):
            c.request("POST", f"/v1/rooms/m{r}/messages?user=filler", json.dumps({"cid": f"c{r}-{i}", "body": body}),
                      {"content-type": "application/json"})
            resp = c.getresponse(); resp.read()
            assert resp.status == 201, resp.status
    time.sleep(2)
    base = rss()
    socks = []
    for n in range(N):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", PORT))
        s.sendall((f"GET /ws?room=home{n}&user=u{n} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        for r in range(R):
            p = json.dumps({"type": "join", "room": f"m{r}", "since": "0"}).encode()
            mask = b"\x01\x02\x03\x04"
            s.sendall(bytes([0x81, 0x80 | len(p)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p)))
        socks.append(s)
    peak = base
    for _ in range(20):
        time.sleep(0.5)
        peak = max(peak, rss())
    c = http.client.HTTPConnection("127.0.0.1", PORT); c.request("GET", "/metrics")
    m = c.getresponse().read().decode()
    for line in m.splitlines():
        if line.startswith(("chat_node_messages_replayed_total", "chat_node_slow_consumer", "chat_node_connections ")):
            print("  ", line)
    per = (peak - base) / N
    print(f"N={N} rooms={R} msgs/room={M} body={B} extra={extra}: RSS before {base/2**20:.1f} MiB, peak {peak/2**20:.1f} MiB, "
          f"{per/2**20:.2f} MiB per connection")
finally:
    node.kill()
