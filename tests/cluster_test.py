#!/usr/bin/env python3
"""scripts/cluster.sh end to end: 3 replicas of the tiny model on the CPU behind a real HAProxy, over loopback.

  failover  40 requests, 4 at a time; after 1 s replica 1 is killed (SIGKILL) with a request in flight:
            all 40 are answered 200 with a PNG of the asked size, and HAProxy takes replica 1 out.
  comeback  replica 1 started again on its ports: HAProxy takes it back.
  drain     replica 2 gets SIGTERM while it runs a long request sent to it directly: once HAProxy has
            taken it out, 6 requests through the balancer all go elsewhere (none in its log or its
            /metrics), its own request is answered 200 and it exits.
  hang      replica 3 stopped (SIGSTOP) leaves the pool within 2 s, and comes back after SIGCONT.
  stop      `cluster.sh stop` leaves no replica and no HAProxy running.

Usage: cluster_test.py ZIMAGE_BINARY      (python3 standard library only; ports picked free at run time)
"""
import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")
REPLICAS = 3
SERVE_ARGS = ["--model-path", "synthetic:tiny", "--backend", "cpu", "--max-batch-size", "1"]
# About 0.2 s each on one core (Release): the 40 requests of the failover phase take several seconds.
SMALL = {"size": "128x128", "num_inference_steps": 8}
SMALL_PNG = (128, 128)
# About 5 s on one core: replica 2 is still running it after the drain phase's requests.
LONG = {"size": "256x256", "num_inference_steps": 100}
# Leave-the-pool bound of the issue; deploy/haproxy.cfg's checks make it at most 1.75 s.
OUT_WITHIN_S = 2.0


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def free_port_block(n):
    """The first of n consecutive ports free on 127.0.0.1, below the kernel's ephemeral range
    (32768+), where the port-0 servers of other tests land."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of %d free ports" % n)


def http(method, url, body=None, headers=None, timeout=120):
    """(status, headers, body bytes); status None when no answer came."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except OSError as e:
        return None, {}, str(e).encode()


def png_size(b64):
    data = base64.b64decode(b64)
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def generate(base, request_id, prompt, extra=SMALL, timeout=120):
    """Status and image size of one generation request with the given X-Request-Id."""
    status, headers, body = http("POST", base + "/v1/images/generations",
                                 {"prompt": prompt, "seed": 1, **extra}, {"X-Request-Id": request_id}, timeout)
    size = png_size(json.loads(body)["data"][0]["b64_json"]) if status == 200 else None
    return status, size, headers.get("X-Request-Id") if status else None


def metric(base, series):
    status, _, body = http("GET", base + "/metrics", timeout=30)
    check(status == 200, "GET %s/metrics: %s" % (base, status))
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Haproxy:
    """HAProxy's admin socket: the state of each server."""

    def __init__(self, path):
        self.path = path

    def command(self, text):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.path)
            s.sendall(text.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def status(self, server):
        """"UP", "DOWN", "DRAIN", "UP 1/2", ... of backend `replicas` server `server`."""
        lines = self.command("show stat").splitlines()
        fields = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(fields, line.split(",")))
            if row.get("pxname") == "replicas" and row.get("svname") == server:
                return row["status"]
        raise AssertionError("HAProxy has no server %s" % server)

    def wait(self, server, wanted, seconds):
        """Seconds until the server's status satisfies `wanted`; fails after `seconds`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if wanted(self.status(server)):
                return time.monotonic() - t0
            time.sleep(0.02)
        raise AssertionError("%s still %s after %.1f s" % (server, self.status(server), seconds))


def wait_in_flight(replica, still_sending, what):
    """Returns once `replica` has a request in flight; fails when `still_sending()` turns false first."""
    while metric(replica, "zimage_requests_in_flight") < 1:
        check(still_sending(), "%s: no request was in flight (they finished too fast: make them larger)" % what)
        time.sleep(0.005)


def pid_of(cluster_dir, name):
    with open(os.path.join(cluster_dir, name + ".pid")) as f:
        return int(f.read())


def running(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


def main():
    zimage = os.path.abspath(sys.argv[1])
    t_start = time.monotonic()
    cluster_dir = tempfile.mkdtemp(prefix="zimage-cluster-")
    print("cluster folder (pids, logs, HAProxy's config and socket): %s" % cluster_dir)
    port = free_port_block(1 + 2 * REPLICAS)
    replica_port = port + 1
    base = "http://127.0.0.1:%d" % port
    replica_base = ["http://127.0.0.1:%d" % (replica_port + 2 * k) for k in range(REPLICAS)]
    env = dict(os.environ, CLUSTER_DIR=cluster_dir)
    restarted = None
    try:
        subprocess.run([CLUSTER, "start", "--replicas", str(REPLICAS), "--port", str(port), "--zimage", zimage,
                        "--ready-timeout", "120", "--"] + SERVE_ARGS, env=env, check=True, timeout=180)
        hap = Haproxy(os.path.join(cluster_dir, "haproxy.sock"))
        print("started: balancer :%d, replicas :%d..:%d, %.1f s" % (port, replica_port, replica_port + 5,
                                                                      time.monotonic() - t_start))
        # The agent checks have reported: every replica at full weight.
        for k in range(1, REPLICAS + 1):
            hap.wait("replica-%d" % k, lambda s: s == "UP", 10)
        status, headers, body = http("GET", base + "/ready")
        check(status == 200 and json.loads(body)["status"] == "ok", "/ready through the balancer: %s %s" % (status, body))
        check(re.fullmatch(r"[0-9a-f-]{36}", headers.get("X-Request-Id", "")),
              "HAProxy's UUID in X-Request-Id: %r" % headers.get("X-Request-Id"))

        # ---- failover: SIGKILL replica 1 with a request in flight ----
        results = {}
        lock = threading.Lock()
        todo = list(range(40))

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    k = todo.pop(0)
                r = generate(base, "fail-%d" % k, "failover %d" % k)
                with lock:
                    results[k] = r

        threads = [threading.Thread(target=client) for _ in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(1.0)
        wait_in_flight(replica_base[0], lambda: any(t.is_alive() for t in threads), "failover")  # one to lose
        os.kill(pid_of(cluster_dir, "replica-1"), signal.SIGKILL)
        killed_at = time.monotonic()
        out_s = hap.wait("replica-1", lambda s: s.startswith("DOWN"), 10)
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        ok = [k for k, r in results.items() if r[0] == 200 and r[1] == SMALL_PNG and r[2] == "fail-%d" % k]
        print("failover: %d/40 answered 200 with a 128x128 PNG in %.1f s; replica 1 killed at %.2f s, "
              "out of the pool after %.2f s" % (len(ok), wall, killed_at - t0, out_s))
        check(len(ok) == 40, "not every request was answered: %s" % {k: r for k, r in results.items() if k not in ok})
        check(out_s <= OUT_WITHIN_S, "the killed replica left the pool after %.2f s" % out_s)
        # HAProxy's log: "+N" in the retries field of a request it sent to another replica after the first failed.
        with open(os.path.join(cluster_dir, "haproxy.log")) as f:
            log = f.read()
        redispatched = re.findall(r"/\+\d+ \d+/\d+ \{fail-\d+\}", log)
        print("failover: %d request(s) redispatched to another replica" % len(redispatched))
        check(redispatched, "no request was retried on another replica")

        # ---- comeback: replica 1 again on its ports ----
        restarted = subprocess.Popen(
            [zimage, "serve"] + SERVE_ARGS + ["--host", "127.0.0.1", "--port", str(replica_port),
                                              "--agent-port", str(replica_port + 1)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(cluster_dir, "replica-1.log"), "a"),
            env=dict(os.environ, ZIMAGE_THREADS="1", OPENBLAS_NUM_THREADS="1"))
        with open(os.path.join(cluster_dir, "replica-1.pid"), "w") as f:
            f.write(str(restarted.pid))
        back_s = hap.wait("replica-1", lambda s: s == "UP", 60)
        print("comeback: replica 1 restarted, back in the pool after %.2f s" % back_s)

        # ---- drain: SIGTERM replica 2 while it runs a long request ----
        long_result = {}
        long_request = threading.Thread(target=lambda: long_result.update(
            r=generate(replica_base[1], "long-1", "long", LONG, 300)))
        long_request.start()
        wait_in_flight(replica_base[1], long_request.is_alive, "drain")
        os.kill(pid_of(cluster_dir, "replica-2"), signal.SIGTERM)
        out_s = hap.wait("replica-2", lambda s: not s.startswith("UP"), 10)
        served_before = metric(replica_base[1], 'zimage_image_requests_total{kind="generations"}')
        drain_results = [generate(base, "drain-%d" % k, "drain %d" % k) for k in range(6)]
        served_after = metric(replica_base[1], 'zimage_image_requests_total{kind="generations"}')
        still_draining = running(pid_of(cluster_dir, "replica-2")) and long_request.is_alive()
        long_request.join()
        print("drain: replica 2 out of the pool %.2f s after SIGTERM (%s); 6 requests through the balancer: %s; "
              "replica 2 took %d of them and was still draining after them: %s; its own request: %s"
              % (out_s, hap.status("replica-2"), [r[0] for r in drain_results], served_after - served_before,
                 still_draining, long_result["r"][:2]))
        check(all(r[0] == 200 and r[1] == SMALL_PNG for r in drain_results), "drain-phase requests failed")
        check(served_after == served_before, "replica 2 took requests while draining")
        check(still_draining, "replica 2 finished draining before the requests were sent: the long request is too short")
        check(long_result["r"][:2] == (200, (256, 256)), "the draining replica's own request: %s" % (long_result["r"],))
        with open(os.path.join(cluster_dir, "replica-2.log")) as f:
            log2 = f.read()
        check("drain-" not in log2, "a drain-phase request reached replica 2")
        for _ in range(600):
            if not running(pid_of(cluster_dir, "replica-2")):
                break
            time.sleep(0.05)
        check("info: stopped" in log2 or "info: stopped" in open(os.path.join(cluster_dir, "replica-2.log")).read(),
              "replica 2 did not stop cleanly")

        # ---- hang: SIGSTOP replica 3 ----
        pid3 = pid_of(cluster_dir, "replica-3")
        os.kill(pid3, signal.SIGSTOP)
        out_s = hap.wait("replica-3", lambda s: s.startswith("DOWN"), 10)
        os.kill(pid3, signal.SIGCONT)
        back_s = hap.wait("replica-3", lambda s: s == "UP", 10)
        print("hang: replica 3 stopped (SIGSTOP) out of the pool after %.2f s; after SIGCONT back after %.2f s"
              % (out_s, back_s))
        check(out_s <= OUT_WITHIN_S, "the hung replica left the pool after %.2f s" % out_s)
        status, size, _ = generate(base, "after-1", "after")
        check((status, size) == (200, SMALL_PNG), "a request after the hang: %s" % status)
    finally:
        pids = {}
        for name in os.listdir(cluster_dir):
            if name.endswith(".pid"):
                pids[name] = pid_of(cluster_dir, name[:-4])
        subprocess.run([CLUSTER, "stop", "--grace", "60"], env=env, timeout=120)
        if restarted:
            restarted.wait(timeout=30)
    left = [name for name, pid in pids.items() if running(pid)]
    # Anything still running that was started for this cluster names its folder or its ports.
    strays = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % p, "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            ours = [" --port %d " % (replica_port + 2 * k) for k in range(REPLICAS)]
            if running(int(p)) and (cluster_dir in cmd or any(o in cmd + " " for o in ours)):
                strays.append(cmd)
    print("stop: %d process(es) left of %d (%s), %d stray; restarted replica 1 exited %s; whole test %.1f s"
          % (len(left), len(pids), ", ".join(sorted(pids)), len(strays), restarted.returncode if restarted else None,
             time.monotonic() - t_start))
    check(not left and not strays, "left running: %s %s" % (left, strays))
    # Under ASan/UBSan a replica that hits a report dies, and HAProxy would hide it by retrying elsewhere.
    for name in sorted(os.listdir(cluster_dir)):
        if name.startswith("replica-") and name.endswith(".log"):
            with open(os.path.join(cluster_dir, name)) as f:
                report = re.search(r"^(==\d+==ERROR: .*|.*runtime error: .*|SUMMARY: .*Sanitizer.*)$", f.read(), re.M)
            check(not report, "%s: %s" % (name, report and report.group(0)))
    check(restarted.returncode == 0, "the restarted replica exited %s after SIGTERM" % restarted.returncode)
    shutil.rmtree(cluster_dir)  # kept, with its logs, when the test fails


if __name__ == "__main__":
    main()
