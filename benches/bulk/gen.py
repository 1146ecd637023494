#!/usr/bin/env python3
"""Inputs of the bulk benchmark (run.sh), written to DIR and kept there: a month's spending
export as JSON lines and as CSV (the same records), the consents to import, and the truth
the figures are checked against.

    gen.py DIR [--records N] [--subjects N] [--consents N] [--seed N]

Files (DIR/):
  2026-11.jsonl   N records, each exactly RECORD_BYTES bytes with its newline (the last field,
                  "memo", pads it), subjects u0000000..u{S-1} in random order: each subject
                  once, plus N-S more drawn uniformly, shuffled; timestamps in order over
                  November 2026, as an export sorted by time lists them
  2026-11.csv     the same records as CSV: a header row, the merchant quoted where it holds a
                  comma, the memo quoted (with doubled quotes) in one record of eight
  consents.jsonl  the registry: every other object subject, chosen at random (half of S),
                  with a valid consent for the bureau; a quarter of S (unconsented ones) with a
                  consent for another recipient only; a quarter of S (consented ones) with one
                  for that other recipient as well; the rest of the consents for subjects
                  outside the object (u{S}...), for the bureau
  truth.json      what the proxy must keep: records and distinct subjects kept and dropped,
                  kept bytes, and the SHA-256 of the filtered JSON lines and CSV bodies
  stamp           the parameters; run.sh regenerates when they change

Pure Python, no dependency: about a minute for 5,000,000 records and 10,000,000 consents.
"""
import argparse, hashlib, json, os, random, sys, time

RECORD_BYTES = 215  # 5,000,000 records x 215 bytes ~ 1 GiB
MERCHANTS = [  # (merchant, category, city)
    ("Hema Fresh Pudong", "groceries", "Shanghai"),
    ("Meituan Waimai", "food_delivery", "Beijing"),
    ("Didi Chuxing", "transport", "Shenzhen"),
    ("JD.com, Self-operated", "electronics", "Beijing"),
    ("Starbucks Reserve Roastery", "coffee", "Shanghai"),
    ("Luckin Coffee #1402", "coffee", "Hangzhou"),
    ("Wumart, Haidian", "groceries", "Beijing"),
    ("China Railway 12306", "transport", "Wuhan"),
]
FILLER = "monthly statement line; see the issuer's terms for details " * 4
RECIPIENT, OTHER_RECIPIENT = "credit-bureau-us", "lender-sg"
CHUNK = 100_000


def csv_field(s):
    if any(c in s for c in ',"\n\r'):
        return '"' + s.replace('"', '""') + '"'
    return s


def records(order, seed):
    """Yields (subject index, JSON line, CSV line) for each record, in order."""
    r = random.Random(seed + 1).random
    n = len(order)
    month = 30 * 86400
    days = ["2026-11-%02dT" % (d + 1) for d in range(30)]
    hms = ["%02d:%02d:%02dZ" % (x // 3600, x // 60 % 60, x % 60) for x in range(86400)]
    # Per merchant: the JSON line's fixed parts, and the CSV's; the memo pads the JSON line
    # to RECORD_BYTES, so its length depends only on the merchant and the amount's digits.
    tmpl = []
    for m, cat, city in MERCHANTS:
        js = ('{"user_id":"u%07d","ts":"%s","merchant":"' + m.replace("%", "%%") + '","amount_cents":%d,"currency":"CNY",'
              '"category":"' + cat + '","city":"' + city + '","txn_id":"t%010d","memo":"%s"}\n')
        cs = "u%07d,%s," + csv_field(m).replace("%", "%%") + ",%d,CNY," + cat + "," + city + ",t%010d,%s\n"
        fixed = len(js % (0, "2026-11-01T00:00:00Z", 0, 0, "")) - 1  # amount 0: one digit
        pads = {d: RECORD_BYTES - fixed - d for d in range(3, 7)}
        assert min(pads.values()) >= 0, m
        tmpl.append((js, cs, pads))
    plain = {p: FILLER[:p] for t in tmpl for p in t[2].values()}
    for i in range(n):
        s = order[i]
        js, cs, pads = tmpl[int(r() * 8)]
        amount = 100 + int(r() * 499_900)
        t = i * month // n
        ts = days[t // 86400] + hms[t % 86400]
        pad = pads[len(str(amount))]
        if i % 8 == 5:  # a memo with quotes; JSON escapes them (two bytes each)
            memo = ('ref "%d" ' % i + FILLER)[:pad]
            memo_json = memo.replace('"', '\\"')
            while len(memo_json) > pad:
                memo = memo[:-1]
                memo_json = memo.replace('"', '\\"')
            memo_json += " " * (pad - len(memo_json))
            memo = memo_json.replace('\\"', '"')
            yield s, js % (s, ts, amount, i, memo_json), cs % (s, ts, amount, i, csv_field(memo))
        else:
            memo = plain[pad]
            yield s, js % (s, ts, amount, i, memo), cs % (s, ts, amount, i, memo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--records", type=int, default=5_000_000)
    ap.add_argument("--subjects", type=int, default=1_000_000)
    ap.add_argument("--consents", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args()
    S, N, C = a.subjects, a.records, a.consents
    if N < S or C < S + S // 2 or S + (C - S - S // 2) > 10_000_000:
        sys.exit("need records >= subjects, consents >= 1.5 x subjects, and subject numbers "
                 "under 10,000,000 (u%07d)")
    os.makedirs(a.dir, exist_ok=True)
    t0 = time.time()
    rng = random.Random(a.seed)

    # Which object subjects consented: exactly half, at random.
    consented = bytearray(S)
    chosen = rng.sample(range(S), S // 2)
    for s in chosen:
        consented[s] = 1
    # The order of subjects in the object: each once, then N-S more, shuffled.
    order = list(range(S)) + [rng.randrange(S) for _ in range(N - S)]
    rng.shuffle(order)
    print("gen: subjects and order in %.1f s" % (time.time() - t0), file=sys.stderr)

    kept = kept_js_bytes = kept_csv_bytes = 0
    hj, hc = hashlib.sha256(), hashlib.sha256()
    csv_header = "user_id,ts,merchant,amount_cents,currency,category,city,txn_id,memo\n"
    hc.update(csv_header.encode())
    with open(os.path.join(a.dir, "2026-11.jsonl.tmp"), "w", buffering=1 << 22) as fj, \
         open(os.path.join(a.dir, "2026-11.csv.tmp"), "w", buffering=1 << 22) as fc:
        fc.write(csv_header)
        bj, bc, kj, kc = [], [], [], []
        for s, js, cs in records(order, a.seed):
            bj.append(js)
            bc.append(cs)
            if consented[s]:
                kj.append(js)
                kc.append(cs)
            if len(bj) == CHUNK:
                fj.write("".join(bj)); fc.write("".join(bc))
                x, y = "".join(kj).encode(), "".join(kc).encode()
                hj.update(x); hc.update(y)
                kept += len(kj); kept_js_bytes += len(x); kept_csv_bytes += len(y)
                bj, bc, kj, kc = [], [], [], []
        fj.write("".join(bj)); fc.write("".join(bc))
        x, y = "".join(kj).encode(), "".join(kc).encode()
        hj.update(x); hc.update(y)
        kept += len(kj); kept_js_bytes += len(x); kept_csv_bytes += len(y)
    print("gen: records in %.1f s" % (time.time() - t0), file=sys.stderr)

    # Consents. Ids are short, as a registry's own keys are.
    line = ('{"id":"c%d","subject":"u%07d","recipient":"%s","purposes":["credit_scoring"],'
            '"categories":["user.financial"],"destinations":["US"],"method":"explicit",'
            '"granted_at":"2026-01-01T00:00:00Z","expires_at":"2030-01-01T00:00:00Z"}\n')
    unconsented = [s for s in range(S) if not consented[s]]
    rng.shuffle(chosen)
    rng.shuffle(unconsented)
    q = S // 4
    groups = [
        ((s, RECIPIENT) for s in chosen),                     # valid: the half that is kept
        ((s, OTHER_RECIPIENT) for s in unconsented[:q]),      # another recipient only
        ((s, OTHER_RECIPIENT) for s in chosen[:q]),           # another recipient as well
        ((s, RECIPIENT) for s in range(S, S + C - S // 2 - 2 * q)),  # subjects outside the object
    ]
    n = 0
    with open(os.path.join(a.dir, "consents.jsonl.tmp"), "w", buffering=1 << 22) as f:
        buf = []
        for g in groups:
            for s, r in g:
                buf.append(line % (n, s, r))
                n += 1
                if len(buf) == CHUNK:
                    f.write("".join(buf)); buf = []
        f.write("".join(buf))
    assert n == C, (n, C)
    print("gen: consents in %.1f s" % (time.time() - t0), file=sys.stderr)

    truth = {
        "records": N, "subjects": S, "consents": C,
        "object_bytes_jsonl": os.path.getsize(os.path.join(a.dir, "2026-11.jsonl.tmp")),
        "object_bytes_csv": os.path.getsize(os.path.join(a.dir, "2026-11.csv.tmp")),
        "kept_records": kept, "dropped_records": N - kept,
        "kept_subjects": S // 2, "dropped_subjects": S - S // 2,
        "kept_bytes_jsonl": kept_js_bytes, "kept_bytes_csv": kept_csv_bytes,
        "sha256_filtered_jsonl": hj.hexdigest(), "sha256_filtered_csv": hc.hexdigest(),
        "recipient": RECIPIENT,
    }
    for name in ("2026-11.jsonl", "2026-11.csv", "consents.jsonl"):
        os.replace(os.path.join(a.dir, name + ".tmp"), os.path.join(a.dir, name))
    json.dump(truth, open(os.path.join(a.dir, "truth.json"), "w"), indent=1)
    with open(os.path.join(a.dir, "stamp"), "w") as f:
        f.write(stamp(a) + "\n")
    print("gen: done in %.1f s" % (time.time() - t0), file=sys.stderr)


def stamp(a):
    """The parameters and this file's own hash: what the cached files were made from."""
    h = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:16]
    return "records=%d subjects=%d consents=%d seed=%d gen=%s" % (a.records, a.subjects, a.consents, a.seed, h)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--stamp":
        ap = argparse.ArgumentParser()
        ap.add_argument("--records", type=int, default=5_000_000)
        ap.add_argument("--subjects", type=int, default=1_000_000)
        ap.add_argument("--consents", type=int, default=10_000_000)
        ap.add_argument("--seed", type=int, default=2026)
        print(stamp(ap.parse_args(sys.argv[2:])))
    else:
        main()
