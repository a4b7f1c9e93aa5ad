#!/usr/bin/env bash
# What the sidecar adds per layer call: the direct TS path and the Python → sidecar path,
# side by side in one run on this machine (it is noisy: runs alternate, A B A B, so both
# paths see the same conditions). Host memory, TCP on loopback, one prepared list of every
# block, sequential calls cycling the layers, warm-up excluded (the same method both sides).
#
#   (A) direct:  node lib/cli.js bench --prepared --batch B --sizes S --layers L --iterations N
#                  --transport tcp --stream-ms 0 --json FILE
#   (B) sidecar: python3 clients/python/bench.py --blocks B --block-bytes S --layers L
#                  --iterations N   (two sidecars; prefill and decode worker processes;
#                  each call timed from write_cache issued to its future resolved)
#
# Usage: scripts/bench-sidecar.sh [options]
#   --sizes "1K 64K"     block sizes (space or comma separated; default 1K 64K)
#   --batch LIST         blocks per call (default 1538); 1 shows the fixed cost of a call;
#                        a list (1538,1) runs each
#   --rounds N           A/B rounds per size and batch (default 3)
#   --layers N           layers, each K and V (default 4)
#   --iterations N       timed calls per run (default: 10 GB worth, 50..2000)
#   --json FILE          also write the table (every round and the medians) as JSON
#   --out DIR            the runs' JSON and logs (default bench-out/sidecar)
# Environment: KVTRANSFER_NODE (node), PYTHON (python3). lib/ must be built (npm run build:ts).
#
# Prints per round and the median over rounds: direct and sidecar p50/p99 µs per call, the
# p50 the sidecar adds (sidecar − direct, paired by round), both GB/s and their ratio
# (sidecar / direct). Exit status: 1 when a run failed or did not verify its bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
node=${KVTRANSFER_NODE:-node}
python=${PYTHON:-python3}
sizes="1K 64K"
batches=1538
rounds=3
layers=4
iterations=
json=
out=bench-out/sidecar

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
  case $1 in
    --sizes) sizes=${2:?--sizes LIST}; shift 2 ;;
    --batch) batches=${2:?--batch N}; shift 2 ;;
    --rounds) rounds=${2:?--rounds N}; shift 2 ;;
    --layers) layers=${2:?--layers N}; shift 2 ;;
    --iterations) iterations=${2:?--iterations N}; shift 2 ;;
    --json) json=${2:?--json FILE}; shift 2 ;;
    --out) out=${2:?--out DIR}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-sidecar: unknown option '$1' (--help)" >&2; exit 2 ;;
  esac
done
sizes=${sizes//,/ }
batches=${batches//,/ }
for n in "$rounds" "$layers" ${iterations:+"$iterations"} $batches; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-sidecar: '$n' is not a count >= 1" >&2; exit 2; }
done
[[ -f lib/cli.js && -f lib/sidecar/serve.js ]] || { echo "bench-sidecar: lib/ is not built (npm run build:ts)" >&2; exit 2; }
mkdir -p "$out"
rm -f "$out"/direct-*.json "$out"/direct-*.log "$out"/sidecar-*.json "$out"/sidecar-*.log

bytes() { # 64K -> 65536
  [[ $1 =~ ^([1-9][0-9]*)([kKmM]?)$ ]] || { echo "bench-sidecar: '$1' is not a size (1K, 64K, 65536)" >&2; exit 2; }
  case ${BASH_REMATCH[2]} in
    k | K) echo $((BASH_REMATCH[1] * 1024)) ;;
    m | M) echo $((BASH_REMATCH[1] * 1048576)) ;;
    *) echo "${BASH_REMATCH[1]}" ;;
  esac
}

# One run; on failure, its log and exit 1.
run() { # name log command...
  local name=$1 log=$2
  shift 2
  if ! "$@" >"$log" 2>&1; then
    echo "bench-sidecar: the $name run failed: $*" >&2
    tail -20 "$log" >&2
    exit 1
  fi
}

for batch in $batches; do
  for size in $sizes; do
    b=$(bytes "$size")
    n=$iterations
    if [[ -z $n ]]; then # 10 GB of K+V per run, at least 50 calls, at most 2000
      n=$((10 * 1000 ** 3 / (2 * batch * b)))
      ((n < 50)) && n=50
      ((n > 2000)) && n=2000
    fi
    for r in $(seq 1 "$rounds"); do
      tag="$size-b$batch-r$r"
      echo "bench-sidecar: $size x $batch blocks, $n calls, round $r/$rounds: direct" >&2
      run direct "$out/direct-$tag.log" "$node" lib/cli.js bench --prepared --batch "$batch" --sizes "$b" \
        --layers "$layers" --iterations "$n" --transport tcp --stream-ms 0 --quiet --json "$out/direct-$tag.json"
      echo "bench-sidecar: $size x $batch blocks, $n calls, round $r/$rounds: sidecar" >&2
      run sidecar "$out/sidecar-$tag.log" "$python" clients/python/bench.py --node "$node" --blocks "$batch" \
        --block-bytes "$b" --layers "$layers" --iterations "$n" --transport tcp --json "$out/sidecar-$tag.json"
    done
  done
done

"$python" - "$out" "$rounds" "$layers" "$json" "$sizes" "$batches" <<'PY'
import json, os, platform, statistics, sys, time

out, rounds, layers, json_path, sizes, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5].split(), sys.argv[6].split()

def load(path):
    with open(path) as f:
        return json.load(f)

rows, medians, ok = [], [], True
for batch in batches:
    for size in sizes:
        paired = []
        for r in range(1, rounds + 1):
            tag = f"{size}-b{batch}-r{r}"
            direct = load(os.path.join(out, f"direct-{tag}.json"))
            result = direct["results"][0]
            sidecar = load(os.path.join(out, f"sidecar-{tag}.json"))
            verified = direct.get("ok", False) and result["verified"]["mismatches"] == 0 and sidecar.get("verified") is not False
            ok = ok and verified
            row = {
                "size": size, "block_bytes": result["blockBytes"], "batch": int(batch), "round": r,
                "calls": result["calls"],
                "direct": {"p50_us": result["p50Ms"] * 1000, "p99_us": result["p99Ms"] * 1000, "gbps": result["gbps"]},
                "sidecar": {"p50_us": sidecar["p50_us"], "p99_us": sidecar["p99_us"], "gbps": sidecar["gbps"]},
                "verified": verified,
            }
            row["p50_added_us"] = row["sidecar"]["p50_us"] - row["direct"]["p50_us"]
            row["gbps_ratio"] = row["sidecar"]["gbps"] / row["direct"]["gbps"] if row["direct"]["gbps"] else float("nan")
            rows.append(row)
            paired.append(row)
        med = lambda f: statistics.median(f(p) for p in paired)
        medians.append({
            "size": size, "block_bytes": paired[0]["block_bytes"], "batch": int(batch), "round": "median",
            "calls": paired[0]["calls"],
            "direct": {k: med(lambda p: p["direct"][k]) for k in ("p50_us", "p99_us", "gbps")},
            "sidecar": {k: med(lambda p: p["sidecar"][k]) for k in ("p50_us", "p99_us", "gbps")},
            "p50_added_us": med(lambda p: p["p50_added_us"]),
            "gbps_ratio": med(lambda p: p["gbps_ratio"]),
            "verified": all(p["verified"] for p in paired),
        })

header = ["size", "batch", "round", "direct p50 µs", "direct p99 µs", "sidecar p50 µs", "sidecar p99 µs",
          "p50 added µs", "direct GB/s", "sidecar GB/s", "ratio s/d"]
def cells(row):
    us = lambda v: f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    gb = lambda v: f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"
    return [row["size"], str(row["batch"]), str(row["round"]), us(row["direct"]["p50_us"]), us(row["direct"]["p99_us"]),
            us(row["sidecar"]["p50_us"]), us(row["sidecar"]["p99_us"]), f"{row['p50_added_us']:+.0f}",
            gb(row["direct"]["gbps"]), gb(row["sidecar"]["gbps"]),
            f"{row['gbps_ratio']:.3f}" + ("" if row["verified"] else " UNVERIFIED")]
table = []
for m in medians:
    table += [cells(r) for r in rows if r["size"] == m["size"] and r["batch"] == m["batch"]] + [cells(m)]
widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(header)]
line = lambda cs: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
print(f"sidecar overhead per layer call: TCP on loopback, host memory, {layers} layers x K+V, prepared lists, "
      f"sequential calls, {rounds} A/B rounds; {cpu} x {os.cpu_count()} cores")
print("A: node lib/cli.js bench --prepared (direct TS)   B: clients/python/bench.py (Python -> sidecar -> sidecar)")
print(line(header))
print("  ".join("-" * w for w in widths))
for i, cs in enumerate(table):
    print(line(cs))
    if cs[2] == "median" and i + 1 < len(table):
        print()
print("p50 added: sidecar p50 - direct p50 of the same round (median: of the rounds' differences); "
      "ratio: sidecar GB/s / direct GB/s")
if json_path:
    with open(json_path, "w") as f:
        json.dump({"tool": "scripts/bench-sidecar.sh", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "machine": {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()},
                   "layers": layers, "rounds": rounds, "transport": "tcp", "memory": "host",
                   "rows": rows, "medians": medians}, f, indent=2)
        f.write("\n")
sys.exit(0 if ok else 1)
PY
