#!/usr/bin/env python3
"""Helpers of run.sh: the upstream, readiness, metrics, and revocation timing."""
import http.client, http.server, json, random, socket, sys, time


def upstream(host, port):
    """A tiny store answering 200 and a small JSON body to every GET, keep-alive."""
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        body = b'{"amount": 1}\n'

        def setup(self):
            super().setup()
            # Headers and body go out in two writes: without this, Nagle's algorithm and the
            # client's delayed ACK hold the body ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)

        def log_message(self, *a):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # A client (a sidecar's pooled connection) closing while a reply is written,
            # as happens when the load stops: nothing to report.
            pass

    s = Server((host, port), H)
    s.daemon_threads = True
    s.request_queue_size = 1024
    s.serve_forever()


def ready(url, since_ns):
    """Polls url every 5 ms until 200; prints ms since since_ns (a time.time_ns())."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=1)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                print("%.1f" % ((time.time_ns() - since_ns) / 1e6))
                return
        except OSError:
            pass
        time.sleep(0.005)
    sys.exit("not ready within 60 s: " + url)


def scrape(admin, out):
    c = http.client.HTTPConnection(admin, timeout=5)
    c.request("GET", "/metrics")
    open(out, "w").write(c.getresponse().read().decode())


def parse(path):
    m = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        k, v = line.rsplit(" ", 1)
        m[k] = float(v)
    return m


def metrics(before, after):
    """Deltas of the cache counters and miss-latency quantiles between two scrapes."""
    a, b = parse(before), parse(after)
    d = lambda k: b.get(k, 0) - a.get(k, 0)
    hits, misses = d("residency_consent_cache_hits_total"), d("residency_consent_cache_misses_total")
    buckets = sorted(
        ((float(k.split('le="')[1].split('"')[0]), d(k)) for k in b
         if k.startswith("residency_consent_lookup_duration_seconds_bucket")),
        key=lambda x: x[0])
    total = d("residency_consent_lookup_duration_seconds_count")

    def q(p):
        for le, cum in buckets:
            if total and cum >= p * total:
                return "<= %g ms" % (le * 1e3) if le != float("inf") else "> last bucket"
        return "-"
    print(json.dumps({
        "hits": hits, "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0,
        "evictions": d("residency_consent_cache_evictions_total"),
        "cache_bytes": b.get("residency_consent_cache_bytes", 0),
        "queries": total, "miss_p50": q(0.5), "miss_p99": q(0.99),
        "feed_lag_s": b.get("residency_consent_feed_lag_seconds", 0),
    }))


def get(conn, path):
    conn.request("GET", path, headers={"X-Purpose": "credit_scoring"})
    r = conn.getresponse()
    return r.status, r.read().decode(errors="replace")


def revocations(a, a_admin, b, token_file, n, count, out):
    """Revokes `count` random consents through A's admin API; times how long until each
    sidecar (A and B) refuses the subject 451 consent_revoked, polling every 5 ms."""
    token = open(token_file).read().strip()
    host = lambda u: (u.split(":")[0], int(u.split(":")[1]))
    ca, cb = http.client.HTTPConnection(*host(a)), http.client.HTTPConnection(*host(b))
    admin = http.client.HTTPConnection(*host(a_admin))
    rows = []
    for _ in range(count):
        i = random.randrange(n)
        path = "/payments/u%d/2026-01.json" % i
        for c in (ca, cb):  # cached on both, granted
            st, body = get(c, path)
            if st != 200:
                st, body = get(c, path)
            assert st == 200, (path, st, body)
        time.sleep(0.05)
        t0 = time.perf_counter()
        admin.request("POST", "/v1/consents/c%d/revoke" % i, body=b"{}",
                      headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        r = admin.getresponse()
        r.read()
        assert r.status == 200, r.status
        t_commit = time.perf_counter() - t0
        seen = {}
        while len(seen) < 2 and time.perf_counter() - t0 < 10:
            for name, c in (("A", ca), ("B", cb)):
                if name in seen:
                    continue
                st, body = get(c, path)
                if st == 451 and "consent_revoked" in body:
                    seen[name] = time.perf_counter() - t0
            if len(seen) < 2:
                time.sleep(0.005)
        rows.append({"consent": "c%d" % i, "commit_ms": t_commit * 1e3,
                     "A_ms": seen.get("A", float("inf")) * 1e3, "B_ms": seen.get("B", float("inf")) * 1e3})
        time.sleep(0.2)
    json.dump(rows, open(out, "w"))
    b_ms = sorted(r["B_ms"] for r in rows)
    all_ms = sorted(max(r["A_ms"], r["B_ms"]) for r in rows)
    c_ms = sorted(r["commit_ms"] for r in rows)
    print(json.dumps({"revocations": len(rows), "commit_median_ms": c_ms[len(c_ms) // 2], "commit_max_ms": c_ms[-1], "B_median_ms": b_ms[len(b_ms) // 2], "B_max_ms": b_ms[-1],
                      "both_median_ms": all_ms[len(all_ms) // 2], "both_max_ms": all_ms[-1]}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "upstream":
        upstream(args[0], int(args[1]))
    elif cmd == "ready":
        ready(args[0], int(args[1]))
    elif cmd == "scrape":
        scrape(args[0], args[1])
    elif cmd == "metrics":
        metrics(args[0], args[1])
    elif cmd == "revocations":
        revocations(args[0], args[1], args[2], args[3], int(args[4]), int(args[5]), args[6])
