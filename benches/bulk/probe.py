#!/usr/bin/env python3
"""Helpers of run.sh: resident-set sampling, waiting for an exchange's outcome record,
metrics scrapes, one run's figures, and the summary table."""
import glob, http.client, json, os, statistics, sys, time


def sample(pid, out, stop):
    """Writes `unix_time vmrss_kib` every 100 ms until the file `stop` exists."""
    with open(out, "w") as f:
        while not os.path.exists(stop):
            try:
                for line in open("/proc/%s/status" % pid):
                    if line.startswith("VmRSS:"):
                        f.write("%.3f %s\n" % (time.time(), line.split()[1]))
                        f.flush()
                        break
            except OSError:
                return
            time.sleep(0.1)


def log_files(logdir):
    return sorted(glob.glob(os.path.join(logdir, "decisions*.jsonl")))


def log_bytes(logdir):
    print(sum(os.path.getsize(p) for p in log_files(logdir)))


def wait_outcome(logdir, decision, timeout=30.0):
    """Polls the log (every 50 ms, at most `timeout` s) until the outcome record of
    `decision` is there; prints the log's size then."""
    needle = ('"id":"%s"' % decision).encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in log_files(logdir):
            with open(p, "rb") as f:
                # The outcome is near the end: read the last 1 MiB only.
                f.seek(max(0, os.path.getsize(p) - (1 << 20)))
                for line in f.read().splitlines():
                    if needle in line and b'"kind":"outcome"' in line:
                        print(sum(os.path.getsize(q) for q in log_files(logdir)))
                        return
        time.sleep(0.05)
    sys.exit("no outcome record for decision %s within %.0f s" % (decision, timeout))


def scrape(admin, out):
    c = http.client.HTTPConnection(admin, timeout=10)
    c.request("GET", "/metrics")
    open(out, "w").write(c.getresponse().read().decode())


def metrics(path):
    m = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        k, v = line.rsplit(" ", 1)
        try:
            m[k] = float(v)
        except ValueError:
            pass
    return m


def exchange(logdir, decision):
    """The decision, disclosure and outcome records of one exchange, from the log."""
    needle = '"%s"' % decision
    dec, outcome, disclosures, lines = None, None, [], 0
    for p in log_files(logdir):
        for line in open(p):
            if needle not in line:
                continue
            r = json.loads(line)
            if r.get("id") != decision:
                continue
            lines += len(line.encode())
            k = r.get("kind")
            if k == "decision":
                dec = r
            elif k == "outcome":
                outcome = r
            elif k == "disclosure":
                disclosures.append(r)
    return dec, outcome, disclosures, lines


def run_figures(runs_file, logdir, truth_file):
    """Adds, to each filtered run of runs_file, what the log says of its exchange."""
    truth = json.load(open(truth_file))
    runs = [json.loads(l) for l in open(runs_file)]
    for r in runs:
        if not r.get("decision"):
            continue
        dec, outcome, disc, exch_bytes = exchange(os.path.join(logdir, r["phase"]), r["decision"])
        r["reason"] = dec.get("reason") if dec else None
        r["exchange_log_bytes"] = exch_bytes
        r["disclosures"] = len(disc)
        subjects = set()
        named = 0
        for d in disc:
            for s in d.get("subjects", []):
                subjects.add(s[0])
                named += 1
        r["disclosed_subjects"] = len(subjects)
        r["disclosed_names"] = named
        r["disclosed_records"] = sum(d.get("records", 0) for d in disc)
        rec = (outcome or {}).get("records") or {}
        r["outcome"] = {k: (outcome or {}).get(k) for k in ("status", "complete", "bytes_in", "bytes_out", "error", "detail")}
        r["kept"] = rec.get("kept")
        r["kept_bytes"] = rec.get("kept_bytes")
        r["dropped"] = rec.get("dropped")
    with open(runs_file, "w") as f:
        for r in runs:
            f.write(json.dumps(r) + "\n")


def rss_figures(samples, t0, t1):
    rows = []
    for line in open(samples):
        t, k = line.split()
        rows.append((float(t), int(k)))
    idle = [k for t, k in rows if t < t0] or [rows[0][1]]
    during = [k for t, k in rows if t0 <= t <= t1] or [rows[-1][1]]
    return {"idle_kib": statistics.median(idle), "min_kib": min(during), "max_kib": max(during),
            "samples": len(during)}


def summary(out, truth_file, cmdline):
    truth = json.load(open(truth_file))
    runs = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))]
    info = json.load(open(os.path.join(out, "info.json")))
    mb = lambda b, s: b / s / 1e6 if s else 0.0
    mib = lambda k: k / 1024.0
    fmt_names = {"jsonl": "JSON lines", "csv": "CSV"}
    by = {}
    for r in runs:
        by.setdefault((r["format"], r["kind"]), []).append(r)
    P = print
    P("# bulk benchmark, %s, commit %s" % (info["when"], info["commit"]))
    P()
    P("command: %s" % cmdline)
    P("machine: %s CPUs, load average before the run %s; proxy %s; upstream and curl %s"
      % (info["cpus"], info["loadavg"], info["proxy_cpus"], info["client_cpus"]))
    P("object: %d records over %d distinct subjects, %d of them consented; JSON lines %.1f MiB, CSV %.1f MiB"
      % (truth["records"], truth["subjects"], truth["kept_subjects"],
         truth["object_bytes_jsonl"] / 2**20, truth["object_bytes_csv"] / 2**20))
    P("registry: %d consents in PostgreSQL (%s); %s" % (truth["consents"], info["pg"], info["import"]))
    P("upstream: nginx %s on 127.0.0.2 (home, CN), sendfile; straight to curl: %s"
      % (info["nginx"], ", ".join("%s %.0f MB/s" % (fmt_names[f], v) for f, v in info["direct"].items())))
    P("proxy: release build, --workers 1, consent cache_max_bytes %d MiB, decision log durability \"write\", signed, pseudonymised"
      % (info["cache_max_bytes"] // 2**20))
    P("client: curl -o /dev/null from 127.0.0.1 (a US third party, the bureau), X-Purpose: credit_scoring")
    P("MB/s = 10^6 bytes of the upstream object per second of curl's total time (request to last byte);")
    P("a filtered response carries about half the object, so its bytes out per second are about half of that.")
    P()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    def thr(r):
        return mb(truth["object_bytes_" + r["format"]], r["secs"])

    def complete(r):
        return r.get("curl_exit", 0) == 0 and (r.get("outcome") or {}).get("complete", True) is not False

    def cut(r):
        o = r.get("outcome") or {}
        return "cut short after %.2f s, %s of %d records kept (%s)" % (
            r["secs"], r.get("kept"), truth["records"], o.get("error") or "curl exit %s" % r.get("curl_exit"))

    def cpu_rate(rs):  # object MB per second of the proxy's CPU time
        return statistics.median(truth["object_bytes_" + r["format"]] / 1e6 / r["proxy_cpu_s"]
                                 for r in rs if r.get("proxy_cpu_s"))

    rows = []
    for f in ("jsonl", "csv"):
        un, cold, warm = by.get((f, "unfiltered"), []), by.get((f, "cold"), []), by.get((f, "warm"), [])
        if not (un and cold and warm):
            continue
        spread = lambda rs: " (%s)" % ", ".join("%.0f" % thr(r) if complete(r) else "cut" for r in rs) if len(rs) > 1 else ""
        unc, warmc = [r for r in un if complete(r)], [r for r in warm if complete(r)]
        u = statistics.median(thr(r) for r in unc) if unc else None
        w = statistics.median(thr(r) for r in warmc) if warmc else None
        c = thr(cold[0]) if complete(cold[0]) else None
        rows.append((f, "unfiltered through the proxy, MB/s (median of %d)" % len(unc),
                     "%.0f%s" % (u, spread(un)) if u else "no complete run", "-", None))
        rows.append((f, "filtered, cold cache (fresh proxy), MB/s",
                     "%.0f" % c if c else cut(cold[0]), ">= 50", c is not None and c >= 50))
        rows.append((f, "filtered, warm cache, MB/s (median of %d complete of %d)" % (len(warmc), len(warm)),
                     "%.0f%s" % (w, spread(warm)) if w else "; ".join(cut(r) for r in warm), "-", None))
        if c or w:
            rows.append((f, "filtered, bytes sent to the client per second: cold / warm (median), MB/s",
                         "%s / %s" % ("%.0f" % mb(cold[0]["bytes"], cold[0]["secs"]) if c else "-",
                                      "%.0f" % statistics.median(mb(r["bytes"], r["secs"]) for r in warmc) if w else "-"),
                         "-", None))
        rows.append((f, "warm / unfiltered", "%.2f" % (w / u) if w and u else "-", ">= 0.5",
                     w is not None and u is not None and w / u >= 0.5))
        rows.append((f, "cold / unfiltered", "%.2f" % (c / u) if c and u else "-", "-", None))
        if unc and warmc:
            cu, cw = cpu_rate(unc), cpu_rate(warmc)
            rows.append((f, "object MB per second of the proxy's own CPU time (machine load aside): unfiltered / warm; ratio",
                         "%.0f / %.0f; %.2f" % (cu, cw, cw / cu), "-", None))
        for name, rs in (("unfiltered", un), ("filtered cold", cold), ("filtered warm", warm)):
            grow = max(mib(r["max_kib"] - r["idle_kib"]) for r in rs)
            extra = ""
            deltas = [r["cache_bytes_delta"] for r in rs if r.get("cache_bytes_delta") is not None]
            if deltas:
                extra = "; the consent cache's own count grew %.1f MiB: +%.1f MiB aside from it" % (
                    max(deltas) / 2**20, max(mib(r["max_kib"] - r["idle_kib"]) - (r.get("cache_bytes_delta") or 0) / 2**20 for r in rs))
            rows.append((f, "resident set, %s (%d run%s, every 100 ms): idle before %.1f, min %.1f, max %.1f MiB%s"
                         % (name, len(rs), "s" if len(rs) > 1 else "", mib(rs[0]["idle_kib"]),
                            mib(min(r["min_kib"] for r in rs)), mib(max(r["max_kib"] for r in rs)), extra),
                         "+%.1f MiB" % grow, "< +100 MiB", grow < 100))
        pick = [("cold", cold[0]), ("warm", warmc[0] if warmc else warm[0])]
        for name, r in pick:
            rows.append((f, "decision of the filtered request, %s" % name, r.get("reason") or "-",
                         "consent_filtered", r.get("reason") == "consent_filtered"))
        for name, r in pick:
            kept_s = truth["kept_subjects"] if complete(r) else r.get("disclosed_subjects") or 0
            per = r["log_growth"] / kept_s if kept_s else None
            rows.append((f, "decision log growth per distinct kept subject, %s run (%d bytes / %d subjects%s)"
                         % (name, r["log_growth"], kept_s, "" if complete(r) else ", named before the run was cut"),
                         "%.1f bytes" % per if per is not None else "-", "<= 100", None if per is None else per <= 100))
        for name, r in pick:
            dropped = sum((r.get("dropped") or {}).values()) if r.get("dropped") is not None else None
            ok = (r.get("kept") == truth["kept_records"] and dropped == truth["dropped_records"]
                  and r.get("kept_bytes") == truth["kept_bytes_" + f])
            rows.append((f, "records kept / dropped (outcome record), %s%s; truth %d / %d, kept bytes %s (truth %d); dropped by reason %s"
                         % (name, "" if complete(r) else " (cut short)", truth["kept_records"], truth["dropped_records"],
                            r.get("kept_bytes"), truth["kept_bytes_" + f], json.dumps(r.get("dropped"))),
                         "%s / %s" % (r.get("kept"), dropped), "= truth", ok))
            kept_s = truth["kept_subjects"]
            rows.append((f, "distinct subjects named in disclosures, %s (%d disclosure records, %d names, %s records)"
                         % (name, r.get("disclosures", 0), r.get("disclosed_names", 0), r.get("disclosed_records")),
                         "%s" % r.get("disclosed_subjects"), "= %d" % kept_s, r.get("disclosed_subjects") == kept_s))
        v = info.get("verify", {}).get(f)
        if v:
            rows.append((f, "filtered body (warm, untimed pass) SHA-256 = the generator's filtered object",
                         "%s bytes" % v["bytes"], "equal", v["sha256"] == truth["sha256_filtered_" + f]))
    P("| object | figure | measured | target | met |")
    P("|---|---|---|---|---|")
    for f, what, val, target, ok in rows:
        P("| %s | %s | %s | %s | %s |" % (fmt_names[f], what, val, target, "-" if ok is None else ("yes" if ok else "**no**")))
    P()
    for f in ("jsonl", "csv"):
        m = info.get("metrics", {}).get(f)
        if m:
            P("%s, consent cache after the cold run: %.1f MiB of %d MiB, %d hits, %d misses, %d evictions; "
              "batch lookups: %d, mean %.2f ms"
              % (fmt_names[f], m["cache_bytes"] / 2**20, info["cache_max_bytes"] // 2**20, m["hits"], m["misses"],
                 m["evictions"], m["batches"], m["batch_mean_ms"]))
    for f in ("jsonl", "csv"):
        if info.get("hwm_kib", {}).get(f):
            P("%s proxy: resident set high-water mark over its whole life %.1f MiB; audit verify: %s"
              % (fmt_names[f], info["hwm_kib"][f] / 1024, info.get("log_verify_" + f, "-").replace("\n", "; ")))
    P()
    P("runs: time (curl), bytes received, proxy CPU time (CPU s / wall s), load average, decision:")
    for r in runs:
        P("  %-5s %-10s %7.2f s  %11d bytes  CPU %6.2f s (%3.0f%%)  load %-14s  HTTP %s  %s  %s%s"
          % (r["format"], r["kind"], r["secs"], r["bytes"], r.get("proxy_cpu_s", 0),
             100 * r.get("proxy_cpu_s", 0) / r["secs"] if r["secs"] else 0, r.get("loadavg", "-"),
             r["code"], r.get("decision") or "-", r.get("reason") or "",
             "" if complete(r) else "  CUT SHORT: %s" % ((r.get("outcome") or {}).get("detail") or "curl exit %s" % r.get("curl_exit"))))


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "sample":
        sample(a[0], a[1], a[2])
    elif cmd == "log-bytes":
        log_bytes(a[0])
    elif cmd == "wait-outcome":
        wait_outcome(a[0], a[1])
    elif cmd == "scrape":
        scrape(a[0], a[1])
    elif cmd == "rss":
        print(json.dumps(rss_figures(a[0], float(a[1]), float(a[2]))))
    elif cmd == "metrics":
        print(json.dumps(metrics(a[0])))
    elif cmd == "run-figures":
        run_figures(a[0], a[1], a[2])
    elif cmd == "digest":
        import hashlib
        h, n = hashlib.sha256(), 0
        while True:
            b = sys.stdin.buffer.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
        print(n, h.hexdigest())
    elif cmd == "summary":
        summary(a[0], a[1], a[2])
    else:
        sys.exit("unknown command " + cmd)
