#!/usr/bin/env python3
"""Load test of `zimage serve` over loopback: throughput and latency at several concurrency levels.

Either starts the server itself (--server: the command without --port; it gets --port 0 and the port
is read from its "listening on" line, and it is stopped with SIGTERM at the end) or talks to one that
runs (--url, loopback addresses only), which may be a load balancer in front of replicas (scripts/cluster.sh;
then --metrics-url once per replica, so that their batches are counted). At each level, `concurrency` clients send requests back to back
until --requests have been sent or --max-seconds have passed; every answer is checked (status, image
count, PNG signature and size). Reports images/s, requests/s and latency percentiles per level, and
the server's own batch sizes from /metrics, as JSON (stdout, and --out FILE).

Python 3 standard library only.

  scripts/loadtest.py --server "build/zimage serve --model-path synthetic:tiny --backend cpu --warmup --warmup-size 64x64" \\
      --size 64x64 --steps 2 --out bench/results/cpu-$(date +%F)-loadtest-tiny.json
  scripts/loadtest.py --server "build/zimage serve --model-path synthetic:turbo --backend cuda --warmup" \\
      --size 1024x1024 --out bench/results/cuda-$(date +%F)-loadtest-turbo.json
  scripts/cluster.sh start --replicas 3 --port 31000 -- --model-path synthetic:tiny --backend cpu
  scripts/loadtest.py --url http://127.0.0.1:31000 --metrics-url http://127.0.0.1:31001 \\
      --metrics-url http://127.0.0.1:31003 --metrics-url http://127.0.0.1:31005 --setup "3 replicas behind HAProxy"
"""
import argparse
import base64
import datetime
import json
import math
import os
import platform
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def http(method, url, body=None, api_key=None, timeout=600):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(bases, api_key):
    """Prometheus text of every server in `bases`, summed -> {series: value} (no HELP/TYPE lines)."""
    out = {}
    for base in bases:
        status, text = http("GET", base + "/metrics", api_key=api_key, timeout=30)
        if status != 200:
            continue
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = out.get(name, 0.0) + float(value)
    return out


def png_size(data):
    """(width, height) from a PNG's IHDR, or None when the bytes are not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[max(0, min(len(sorted_values), rank) - 1)]


def run_level(base, metrics_bases, args, concurrency, width, height):
    lock = threading.Lock()
    sent = [0]
    latencies, errors = [], {}
    images = [0]
    deadline = time.monotonic() + args.max_seconds

    def client():
        while True:
            with lock:
                if sent[0] >= args.requests or time.monotonic() >= deadline:
                    return
                k = sent[0]
                sent[0] += 1
            body = {"prompt": args.prompt + " #%d" % k, "size": args.size, "n": args.n, "seed": k,
                    "output_format": "png"}
            if args.steps:
                body["num_inference_steps"] = args.steps
            t0 = time.monotonic()
            try:
                status, raw = http("POST", base + "/v1/images/generations", body, args.api_key)
            except Exception as e:  # connection refused or reset: counted, the run goes on
                status, raw = type(e).__name__, b""
            dt = time.monotonic() - t0
            problem = None
            if status != 200:
                problem = "http_%s" % status
            else:
                data = json.loads(raw)["data"]
                sizes = [png_size(base64.b64decode(d["b64_json"])) for d in data]
                if len(data) != args.n or any(s != (width, height) for s in sizes):
                    problem = "bad_images"
            with lock:
                if problem:
                    errors[problem] = errors.get(problem, 0) + 1
                else:
                    latencies.append(dt)
                    images[0] += args.n

    before = metrics(metrics_bases, args.api_key)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = metrics(metrics_bases, args.api_key)

    def delta(series):
        return after.get(series, 0.0) - before.get(series, 0.0)

    batches = delta("zimage_batch_images_count")
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        # The 1-minute load average of the machine (other work on it shows here), before and after.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "requests_sent": sent[0],
        "requests_ok": len(latencies),
        "errors": errors,
        "images": images[0],
        "wall_s": round(wall, 3),
        "throughput_images_per_s": round(images[0] / wall, 3),
        "throughput_requests_per_s": round(len(latencies) / wall, 3),
        "latency_s": {
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p99": percentile(lat, 99),
            "mean": sum(lat) / len(lat) if lat else None,
            "max": lat[-1] if lat else None,
        },
        "server_batches": int(batches),
        "server_mean_batch_images": round(delta("zimage_batch_images_sum") / batches, 3) if batches else None,
        "server_mean_denoise_s": round(delta('zimage_stage_seconds_sum{stage="denoise"}') / batches, 4) if batches else None,
    }


def start_server(command):
    argv = shlex.split(command) + ["--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on http://" not in line:
        proc.kill()
        sys.exit("loadtest: the server did not start: %r" % line)
    return proc, line.strip().rsplit(" ", 1)[-1]


def wait_ready(base, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if http("GET", base + "/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("loadtest: /health did not report ready within %d s" % seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="command that starts `zimage serve` (without --host/--port)")
    where.add_argument("--url", help="a running server or load balancer on this machine, e.g. http://127.0.0.1:30000")
    ap.add_argument("--metrics-url", action="append", default=[],
                    help="a server whose /metrics count the batches (repeat once per replica behind --url; "
                         "default: the server itself)")
    ap.add_argument("--setup", default=None, help="what serves --url, for the report (\"3 replicas behind HAProxy\")")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=48, help="requests per level (default 48)")
    ap.add_argument("--max-seconds", type=float, default=120, help="stop sending at a level after this (default 120)")
    ap.add_argument("--size", default="1024x1024", help="image size WxH (default 1024x1024)")
    ap.add_argument("--steps", type=int, default=0, help="num_inference_steps (default: the model's)")
    ap.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    ap.add_argument("--prompt", default="A futuristic cyberpunk city at night, neon lights reflecting on wet streets")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    proc = None
    if args.server:
        proc, base = start_server(args.server)
    else:
        base = args.url.rstrip("/")
    metrics_bases = [u.rstrip("/") for u in args.metrics_url] or [base]
    for url in [base] + metrics_bases:
        if urllib.parse.urlparse(url).hostname not in LOOPBACK:
            sys.exit("loadtest: loopback servers only (127.0.0.1, localhost, ::1)")
    try:
        wait_ready(base, 1800)
        status, raw = http("GET", base + "/v1/models", api_key=args.api_key, timeout=30)
        model = json.loads(raw)["data"][0]["id"] if status == 200 else None
        # One untimed request per server so that no level pays for first-use costs of this size.
        warm = {"prompt": "warm-up", "size": args.size, "n": 1}
        if args.steps:
            warm["num_inference_steps"] = args.steps
        for server in metrics_bases:
            http("POST", server + "/v1/images/generations", warm, args.api_key)
        levels = [run_level(base, metrics_bases, args, int(c), width, height) for c in args.concurrency.split(",")]
    finally:
        exit_code = None
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    report = {
        "tool": "scripts/loadtest.py",
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "server_command": args.server,
        "url": None if args.server else base,
        "setup": args.setup,
        "metrics_urls": None if args.server else metrics_bases,
        "server_exit_code_after_sigterm": exit_code,
        "model": model,
        "request": {"size": args.size, "num_inference_steps": args.steps or "model default", "n": args.n,
                    "output_format": "png", "response_format": "b64_json"},
        "requests_per_level": args.requests,
        "max_seconds_per_level": args.max_seconds,
        "levels": levels,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
