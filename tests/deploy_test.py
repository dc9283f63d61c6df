#!/usr/bin/env python3
"""deploy/ checked as far as this machine can without a container runtime or a cluster:

  - deploy/haproxy.cfg passes `haproxy -c`, and health-checks the path the engine serves readiness on;
  - every YAML document of deploy/k8s/ parses and has the kind expected;
  - the Deployment's ports, probe paths, Prometheus annotations, grace period and user agree with each
    other, with the Service, the HPA, the Prometheus adapter rule and the Dockerfile;
  - every flag the Deployment and the Dockerfile pass is one of `zimage serve`'s;
  - `zimage serve` run with the Deployment's arguments (the tiny model on the CPU, any free port) answers
    the probes' paths with 200 and reports the HPA's metric on /metrics, and exits 0 on SIGTERM.

Usage: deploy_test.py ZIMAGE_BINARY     (needs PyYAML: Debian's python3-yaml, which scripts/setup.sh installs)
"""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    import yaml
except ImportError:
    print("deploy_test: skipped: PyYAML is not installed (scripts/setup.sh installs python3-yaml)")
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def flag_value(args, flag):
    """The value after the last `flag` in an argument list, or None."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values else None


def serve_flags(zimage):
    help_text = subprocess.run([zimage, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z0-9-]+", help_text))


def check_haproxy():
    check(shutil.which("haproxy"), "haproxy is not installed (scripts/setup.sh installs it)")
    with open(os.path.join(DEPLOY, "haproxy.cfg")) as f:
        cfg = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        # The admin socket's folder (/run/haproxy) exists only where the Debian package has run.
        path = os.path.join(tmp, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(re.sub(r"stats socket \S+", "stats socket %s/admin.sock" % tmp, cfg))
        r = subprocess.run(["haproxy", "-c", "-f", path], capture_output=True, text=True)
    check(r.returncode == 0, "haproxy -c: %s%s" % (r.stdout, r.stderr))
    check(re.search(r"^\s*option httpchk GET /ready$", cfg, re.M), "HAProxy does not health-check /ready")
    check(re.search(r"^\s*default-server .*\bagent-check\b", cfg, re.M), "HAProxy does not use the agent check")
    print("haproxy -c deploy/haproxy.cfg: valid; checks GET /ready and the agent port")


def load_k8s():
    docs = {}
    for path in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    print("deploy/k8s: %d documents parse: %s" % (len(docs), ", ".join("%s/%s" % k for k in sorted(docs))))
    for kind in ["Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "PersistentVolumeClaim"]:
        check(any(k == kind for k, _ in docs), "no %s in deploy/k8s" % kind)
    return docs


def dockerfile():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    stages = [l for l in lines if l.startswith("FROM ")]
    check(len(stages) == 2 and "-devel-" in stages[0] and " AS build" in stages[0] and "-runtime-" in stages[1],
          "the Dockerfile is not a toolkit-image build stage and a runtime-image stage: %s" % stages)
    last = lines[lines.index(stages[1]):]
    user = [l.split()[1] for l in last if l.startswith("USER ")]
    check(user and user[-1] not in ("0", "root"), "the runtime stage runs as root")
    get = lambda word: next(json.loads(l[len(word) + 1:]) if l[len(word) + 1:].startswith("[") else l.split()[1:]
                            for l in last if l.startswith(word + " "))
    return {"user": int(user[-1]), "volume": get("VOLUME"), "expose": get("EXPOSE"), "entrypoint": get("ENTRYPOINT"),
            "cmd": get("CMD")}


def check_manifests(docs, flags, docker):
    (dep,) = [d for (k, _), d in docs.items() if k == "Deployment"]
    (svc,) = [d for (k, _), d in docs.items() if k == "Service"]
    (hpa,) = [d for (k, _), d in docs.items() if k == "HorizontalPodAutoscaler"]
    (rules,) = [d for (k, _), d in docs.items() if k == "ConfigMap"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    args = c["args"]
    unknown = [a for a in args + docker["cmd"] if a.startswith("--") and a not in flags]
    check(not unknown, "flags `zimage serve` does not have: %s" % unknown)
    check(docker["entrypoint"][-1] == "serve" and "/zimage" in docker["entrypoint"][0],
          "the image's entrypoint is not `zimage serve`: %s" % docker["entrypoint"])

    port = int(flag_value(args, "--port"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(ports.get("http") == port, "containerPort http %s is not --port %d" % (ports.get("http"), port))
    check(flag_value(args, "--host") == "0.0.0.0", "the pod must listen on 0.0.0.0, not %s" % flag_value(args, "--host"))
    check(int(docker["expose"][0]) == port and int(flag_value(docker["cmd"], "--port")) == port,
          "the Dockerfile's EXPOSE/--port differ from the Deployment's %d" % port)
    check(int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port
          and pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics", "Prometheus scrapes elsewhere")
    check(all(p["targetPort"] in ports or p["targetPort"] in ports.values() for p in svc["spec"]["ports"]),
          "the Service targets a port the pod does not have")
    check(svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), "the Service selects no pod")
    probes = {name: (c[name]["httpGet"]["path"], c[name]["httpGet"]["port"])
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    check(probes == {"startupProbe": ("/health", "http"), "livenessProbe": ("/health", "http"),
                     "readinessProbe": ("/ready", "http")}, "probes: %s" % probes)

    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    check(pre_stop[0] == "sleep", "preStop does not wait: %s" % pre_stop)
    drain = float(flag_value(args, "--request-timeout"))  # no accepted request outlives it
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    check(grace >= float(pre_stop[1]) + drain, "terminationGracePeriodSeconds %s < preStop %s + --request-timeout %s"
          % (grace, pre_stop[1], drain))
    check(c["resources"]["limits"].get("nvidia.com/gpu") == 1, "not one GPU per pod")
    check(pod["spec"]["securityContext"]["runAsUser"] == docker["user"], "the pod's user is not the image's")
    mount = c["volumeMounts"][0]["mountPath"]
    check(flag_value(args, "--model-path").startswith(mount + "/") and docker["volume"][0] == mount
          and flag_value(docker["cmd"], "--model-path").startswith(mount + "/"),
          "the model path is not on the model volume")

    check(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "the HPA scales another Deployment")
    (metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    (rule,) = yaml.safe_load(rules["data"]["config.yaml"])["rules"]
    check(rule["name"]["as"] == metric and rule["seriesQuery"].startswith(metric + "{"),
          "the adapter rule does not serve %s" % metric)
    print("deploy/k8s: port %d (containerPort, Service, Prometheus, Dockerfile), probes %s, grace %d s >= preStop "
          "%s s + --request-timeout %g s, HPA on %s, %d serve flags known"
          % (port, probes, grace, pre_stop[1], drain, metric, sum(a.startswith("--") for a in args + docker["cmd"])))
    return args, probes, metric


def check_serve(zimage, args, probes, metric):
    """The Deployment's arguments with the tiny model on the CPU, on a free loopback port."""
    run = list(args)
    run[run.index("--model-path") + 1] = "synthetic:tiny"
    run[run.index("--host") + 1] = "127.0.0.1"
    run[run.index("--port") + 1] = "0"
    run += ["--backend", "cpu", "--warmup-size", "64x64"]
    proc = subprocess.Popen([zimage, "serve"] + run, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        check("listening on http://" in line, "zimage serve %s did not start: %r" % (shlex.join(run), line))
        base = line.strip().rsplit(" ", 1)[-1]
        answers = {}
        for path in sorted({p for p, _ in probes.values()} | {"/metrics"}):
            for _ in range(1200):  # the warm-up runs first
                try:
                    with urllib.request.urlopen(base + path, timeout=30) as r:
                        answers[path] = (r.status, r.read().decode())
                        break
                except OSError:  # 503 (urllib's HTTPError) while loading and warming up
                    time.sleep(0.05)
        statuses = {p: a[0] for p, a in answers.items()}
        check(statuses == {"/health": 200, "/ready": 200, "/metrics": 200}, "probe paths answered %s" % statuses)
        check(re.search(r"^%s \d" % metric, answers["/metrics"][1], re.M), "/metrics has no %s" % metric)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    check(code == 0, "zimage serve exited %s after SIGTERM" % code)
    print("zimage serve with the Deployment's arguments: %s answered 200, /metrics has %s, SIGTERM -> exit %d"
          % (", ".join(sorted(statuses)), metric, code))


def main():
    zimage = os.path.abspath(sys.argv[1])
    check_haproxy()
    docs = load_k8s()
    args, probes, metric = check_manifests(docs, serve_flags(zimage), dockerfile())
    check_serve(zimage, args, probes, metric)


if __name__ == "__main__":
    main()
