"""A local Apache Flink session cluster for beamcap jobs: ``beamcap-flink start|options|status|stop``.

    beamcap-flink start                        # JobManager, 2 TaskManagers (2 slots each), Beam's job server
    beamcap-caption --recipe r.yaml $(beamcap-flink options)
    beamcap-flink status
    beamcap-flink stop

``start`` gets the jars with Maven (cached in ``~/.cache/beamcap/flink``, or ``--cache``), writes a Flink config
into the run folder (``/tmp/beamcap-flink``, or ``--run-dir``), and starts separate JVMs bound to 127.0.0.1: one
JobManager, the TaskManagers and Beam's Flink job server. Logs go to ``<run-dir>/logs``. ``start`` when the cluster
runs restarts only what died (a killed TaskManager, say); ``stop`` ends exactly the processes it started, by pid.
``options`` prints the Beam pipeline options that run a job on this cluster.

Jars. Beam's Flink runner for a Flink version is ``org.apache.beam:beam-runners-flink-<flink minor>``; its job
server's main class is in it, so the runner and its dependencies are the job server. ``start`` uses the runner of
the installed apache-beam, so the job server and the Python SDK are the same release. On this project's machines,
Maven Central's mirror serves Beam's Flink runner only at 2.62.0 (Flink 1.19.0), which is why requirements.txt pins
apache-beam 2.62.0; where Maven serves no runner of the installed release, ``start`` falls back to
:data:`FALLBACK_BEAM`'s and logs the mismatch.

SDK workers run in Beam's PROCESS environment: each TaskManager starts ``python -m pipelines.flink_worker`` with the
interpreter that ran ``start`` (so it has beamcap installed), one per TaskManager per job, reused by the job's tasks
there (Beam's jars are on the TaskManagers' classpath, parent first, and jobs pass ``--environment_cache_millis``).

Fault tolerance: the cluster restarts a failed job region up to 3 times (``restart-strategy: fixed-delay``; Flink's
default for batch jobs is no restart). A lost TaskManager's tasks run again on the slots left, or on the
TaskManager ``start`` brings back; file sinks write each record exactly once. When no slots are left, the job fails
loudly (a non-zero exit), never green with missing rows.

Not loopback-only: Beam's job server binds its job and artifact ports, and the Fn API servers each TaskManager
opens while a job runs, on all interfaces (Beam's server factory takes no host); all traffic between the
processes is on 127.0.0.1. Flink's own ports (RPC, blob, REST, data) are bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HOST = "127.0.0.1"
FLINK_MINOR = "1.19"
FALLBACK_BEAM = "2.62.0"
"""The newest Beam whose Flink runner (with every dependency) Maven Central's mirror here resolves."""
LOG4J = "2.17.1"  # the log4j2 that Flink 1.19 ships with
DEFAULT_CACHE = os.environ.get(
    "BEAMCAP_FLINK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "beamcap", "flink")
)
DEFAULT_RUN_DIR = os.environ.get("BEAMCAP_FLINK_RUN_DIR", "/tmp/beamcap-flink")
DEFAULT_PORTS = {"rest": 8081, "rpc": 6123, "blob": 6124, "job": 8099, "artifact": 8098}
PARALLELISM = 2
"""A job's parallelism: half the default 4 slots, so a lost TaskManager's work has free slots to run again on."""
UNAVAILABLE = ".unavailable"
"""The marker of a "Maven does not serve this" answer, in the resolution's cache folder; delete it to ask at once."""
RETRY_UNAVAILABLE_AFTER_S = 24 * 3600
"""How long that answer is trusted before Maven is asked again (a network failure looks the same)."""

JAVA_OPENS = [  # what Flink's own distribution passes to Java 17
    *(f"--add-exports={m}=ALL-UNNAMED" for m in (
        "java.base/sun.net.util", "java.rmi/sun.rmi.registry", "jdk.compiler/com.sun.tools.javac.api",
        "jdk.compiler/com.sun.tools.javac.file", "jdk.compiler/com.sun.tools.javac.parser",
        "jdk.compiler/com.sun.tools.javac.tree", "jdk.compiler/com.sun.tools.javac.util",
        "java.security.jgss/sun.security.krb5")),
    *(f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
        "java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect", "java.text", "java.time",
        "java.util", "java.util.concurrent", "java.util.concurrent.atomic", "java.util.concurrent.locks")),
]  # fmt: skip
JVM = ["-XX:+UseSerialGC", "-Djava.net.preferIPv4Stack=true"]
LOG4J_PROPERTIES = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainFile
appender.main.name = MainFile
appender.main.type = File
appender.main.append = true
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
logger.pekko.name = org.apache.pekko
logger.pekko.level = WARN
logger.netty.name = org.apache.flink.shaded.netty4.io.netty
logger.netty.level = WARN
"""


class ClusterError(RuntimeError):
    """The cluster could not be started or reached; the message says what happened (with log tails)."""


def _log(message: str) -> None:
    print(f"beamcap-flink: {message}", file=sys.stderr, flush=True)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def rest(port: int, path: str, timeout: float = 5) -> dict:
    """GET a JSON document from the JobManager's REST API."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 32768))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


# --- jars --------------------------------------------------------------------------------------------------------


def _maven_classpath(folder: str, dependencies: list[tuple[str, str, str]], repo: str) -> list[str] | None:
    """The jars of these Maven dependencies and everything they need, resolved into ``repo`` once (None: not
    served)."""
    listing, done = os.path.join(folder, "classpath.txt"), os.path.join(folder, ".complete")
    missing = os.path.join(folder, UNAVAILABLE)
    try:
        if time.time() - os.path.getmtime(missing) < RETRY_UNAVAILABLE_AFTER_S:
            return None
    except FileNotFoundError:
        pass
    if os.path.exists(done):
        jars = _read_classpath(listing)
        if jars and all(os.path.exists(j) for j in jars):
            return jars
    os.makedirs(folder, exist_ok=True)
    deps = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in dependencies
    )
    with open(os.path.join(folder, "pom.xml"), "w") as f:
        f.write(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            "<groupId>local.beamcap</groupId><artifactId>flink</artifactId><version>1</version>"
            f"<packaging>pom</packaging><dependencies>{deps}</dependencies></project>"
        )
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ClusterError("Maven (mvn) is not on PATH: it fetches the Flink and Beam jars (install Maven and Java 17)")
    command = [mvn, "-B", "-q", "-f", os.path.join(folder, "pom.xml"), f"-Dmaven.repo.local={repo}",
               "dependency:build-classpath", f"-Dmdep.outputFile={listing}", "-DincludeScope=runtime"]  # fmt: skip
    with open(os.path.join(folder, "maven.log"), "w") as out:
        status = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if status != 0 or not os.path.exists(listing):
        open(missing, "w").close()
        return None
    jars = _read_classpath(listing)
    open(done, "w").close()
    return jars


def _read_classpath(listing: str) -> list[str]:
    """The jars Maven's ``dependency:build-classpath`` wrote to ``listing``."""
    with open(listing) as f:
        return [j for j in f.read().strip().split(os.pathsep) if j]


def fetch_jars(cache: str) -> dict:
    """The job server's classpath (Beam's Flink runner and its dependencies) and the JobManager's (Flink alone)."""
    import apache_beam

    repo = os.path.join(cache, "m2repo")
    log4j = [("org.apache.logging.log4j", a, LOG4J) for a in ("log4j-slf4j-impl", "log4j-core", "log4j-api")]
    for beam in dict.fromkeys([apache_beam.__version__, FALLBACK_BEAM]):
        folder = os.path.join(cache, f"beam-{beam}-flink-{FLINK_MINOR}")
        runner = ("org.apache.beam", f"beam-runners-flink-{FLINK_MINOR}", beam)
        _log(f"resolving {':'.join(runner)} with Maven (cached in {cache})")
        resolved = os.path.join(folder, "jobserver")
        jobserver = _maven_classpath(resolved, [runner, *log4j], repo)
        if jobserver is not None:
            break
        _log(
            f"Maven does not serve {':'.join(runner)} with all its dependencies (answer cached for a day in "
            f"{os.path.join(resolved, UNAVAILABLE)}: delete it to ask again)"
        )
    else:
        raise ClusterError(f"Maven serves no Beam Flink runner for Flink {FLINK_MINOR}; see {resolved}/maven.log")
    flink = next(os.path.basename(j)[len("flink-runtime-") : -len(".jar")] for j in jobserver
                 if os.path.basename(j).startswith("flink-runtime-"))  # fmt: skip
    flink_only = [("org.apache.flink", a, flink) for a in ("flink-runtime", "flink-clients", "flink-java")]
    cluster = _maven_classpath(os.path.join(folder, "cluster"), [*flink_only, *log4j], repo)
    if cluster is None:
        raise ClusterError(f"Maven does not serve Flink {flink}; see {folder}/cluster/maven.log")
    if beam != apache_beam.__version__:
        _log(
            f"warning: the job server is Beam {beam} (Flink {flink}) but the Python SDK is Beam "
            f"{apache_beam.__version__}; they should be the same release (pip install apache-beam=={beam})"
        )
    return {"beam": beam, "flink": flink, "jobserver": jobserver, "cluster": cluster}


# --- configuration and processes ---------------------------------------------------------------------------------


def flink_config(args: argparse.Namespace, run_dir: str) -> dict:
    config = {
        "jobmanager.rpc.address": HOST, "jobmanager.bind-host": HOST, "jobmanager.rpc.port": args.ports["rpc"],
        "jobmanager.memory.process.size": "768m",
        "taskmanager.host": HOST, "taskmanager.bind-host": HOST, "taskmanager.numberOfTaskSlots": args.slots,
        "taskmanager.memory.process.size": "1280m", "taskmanager.memory.managed.size": "32m",
        # Beam's batch translation needs many network buffers: with the 64m default, a job with two file sinks
        # failed with "Insufficient number of network buffers".
        "taskmanager.memory.network.min": "256m", "taskmanager.memory.network.max": "256m",
        "rest.address": HOST, "rest.bind-address": HOST, "rest.port": args.ports["rest"],
        "blob.server.port": args.ports["blob"], "io.tmp.dirs": os.path.join(run_dir, "tmp"),
        "parallelism.default": PARALLELISM, "cluster.evenly-spread-out-slots": "true",
        "heartbeat.interval": 2000, "heartbeat.timeout": 10000, "web.submit.enable": "false",
        # The REST API's task metrics (records read, per TaskManager) are refreshed every second, not every 10 s:
        # progress shows while a short job runs.
        "metrics.fetcher.update-interval": 1000,
        "restart-strategy.type": "fixed-delay", "restart-strategy.fixed-delay.attempts": args.restart_attempts,
        "restart-strategy.fixed-delay.delay": "2 s",
        # Beam's jars are on the TaskManagers' classpath too, loaded parent first, so that Beam keeps a job's SDK
        # worker for all its tasks on a TaskManager (otherwise every task starts a Python process of its own).
        "classloader.resolve-order": "parent-first",
    }  # fmt: skip
    if args.restart_attempts == 0:
        config = {k: v for k, v in config.items() if not k.startswith("restart-strategy.fixed")}
        config["restart-strategy.type"] = "none"
    return config


def _java(name: str, classpath: list[str], main: str, run_dir: str, jvm: list[str], args: list[str]) -> list[str]:
    return [
        "java", *JVM, *JAVA_OPENS, *jvm, f"-Dlog.file={os.path.join(run_dir, 'logs', name + '.log')}",
        f"-Dlog4j.configurationFile=file:{os.path.join(run_dir, 'conf', 'log4j.properties')}",
        "-cp", os.pathsep.join(classpath), main, *args,
    ]  # fmt: skip


def _memory_flags(classpath: list[str], conf: str, what: str) -> tuple[list[str], list[str]]:
    """The memory settings Flink's own start scripts compute (``BashJavaUtils``): (JVM flags, program arguments)."""
    main = "org.apache.flink.runtime.util.bash.BashJavaUtils"
    out = subprocess.run(["java", *JVM, "-cp", os.pathsep.join(classpath), main, what, "--configDir", conf],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    results = [line.split(":", 1)[1] for line in out.stdout.splitlines() if line.startswith("BASH_JAVA_UTILS_EXEC")]
    if out.returncode != 0 or len(results) < 2:
        raise ClusterError(f"Flink could not size the {what} memory:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return results[0].split(), ["--configDir", conf, *results[1].split()]


def commands(state: dict) -> dict[str, list[str]]:
    """The command of every component, from the saved state."""
    run_dir, ports = state["run_dir"], state["ports"]
    jm = state["memory"]["jm"]
    cmds = {
        "jobmanager": _java("jobmanager", state["cluster"], "org.apache.flink.runtime.entrypoint."
                            "StandaloneSessionClusterEntrypoint", run_dir, jm[0], jm[1]),
    }  # fmt: skip
    tm = state["memory"]["tm"]
    for i in range(1, state["taskmanagers"] + 1):
        cmds[f"taskmanager-{i}"] = _java(
            f"taskmanager-{i}", state["jobserver"], "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
            run_dir, tm[0], [*tm[1], "-D", f"taskmanager.resource-id=tm-{i}"],
        )  # fmt: skip
    cmds["jobserver"] = _java(
        "jobserver", state["jobserver"], "org.apache.beam.runners.flink.FlinkJobServerDriver", run_dir, ["-Xmx768m"],
        [f"--flink-master={HOST}:{ports['rest']}", f"--job-host={HOST}", f"--job-port={ports['job']}",
         f"--artifact-port={ports['artifact']}", "--expansion-port=-1",
         f"--flink-conf-dir={os.path.join(run_dir, 'conf')}", f"--artifacts-dir={os.path.join(run_dir, 'artifacts')}"],
    )  # fmt: skip
    return cmds


def _started_at(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): with the pid, it identifies the process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return None


def alive(entry: dict) -> bool:
    """Whether the recorded process still runs, and is the one that was started (not a reused pid)."""
    return _started_at(entry["pid"]) == entry["started_at"]


def _spawn(name: str, command: list[str], run_dir: str, env: dict) -> dict:
    log = os.path.join(run_dir, "logs", f"{name}.log")
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    with open(os.path.join(run_dir, "logs", f"{name}.out"), "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=run_dir, env=env, start_new_session=True)  # fmt: skip
    return {"pid": process.pid, "started_at": _started_at(process.pid), "log": log, "log_offset": offset}


def load_state(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save_state(state: dict) -> None:
    path = os.path.join(state["run_dir"], "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)


def _registered(entry: dict) -> bool:
    """The TaskManager's log, since this start, says it registered (REST lists a killed one until its heartbeat
    times out, and a restarted one has the same id)."""
    try:
        with open(entry["log"], "rb") as f:
            f.seek(entry["log_offset"])
            return b"Successful registration at resource manager" in f.read()
    except OSError:
        return False


def _wait_ready(state: dict, timeout: float) -> None:
    deadline, checks = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        for name, entry in state["components"].items():
            if not alive(entry):
                raise ClusterError(f"{name} (pid {entry['pid']}) exited while starting:\n{_tail(entry['log'])}")
        tms = [e for n, e in state["components"].items() if n.startswith("taskmanager-")]
        checks = {
            "rest": _port_open(state["ports"]["rest"]),
            "taskmanagers registered": sum(map(_registered, tms)),
            "jobserver": _port_open(state["ports"]["job"]),
        }
        if checks["rest"] and checks["jobserver"] and checks["taskmanagers registered"] == len(tms):
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {n}:\n{_tail(e['log'], 10)}" for n, e in state["components"].items())
    raise ClusterError(f"not ready after {timeout:.0f} s ({checks}):\n{tails}")


def _stop(entries: dict[str, dict]) -> None:
    """SIGTERM the recorded process groups that are still ours, then SIGKILL what remains after 15 s."""
    running = {name: e["pid"] for name, e in entries.items() if alive(e)}
    for pid in running.values():
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while running and time.monotonic() < deadline:
        running = {n: pid for n, pid in running.items() if _started_at(pid) is not None}
        time.sleep(0.2)
    for pid in running.values():
        os.killpg(pid, signal.SIGKILL)


# --- commands ----------------------------------------------------------------------------------------------------


def start(args: argparse.Namespace) -> dict:
    """Start the cluster, or the components of a running one that died; returns its state once it is ready."""
    run_dir = os.path.abspath(args.run_dir)
    state = load_state(run_dir)
    if state is not None and not any(alive(e) for e in state["components"].values()):
        state = None  # left by a cluster that is gone
    if state is None:
        for sub in ("logs", "conf", "tmp", "artifacts"):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
        busy = [f"{name} {port}" for name, port in args.ports.items() if _port_open(port)]
        if busy:
            raise ClusterError(f"ports in use on {HOST}: {', '.join(busy)} (stop what uses them, or pass other ports)")
        jars = fetch_jars(os.path.abspath(args.cache))
        conf = os.path.join(run_dir, "conf")
        with open(os.path.join(conf, "config.yaml"), "w") as f:  # flat key: value, which Flink 1.19 and 2.x read
            f.writelines(f"{k}: {v}\n" for k, v in flink_config(args, run_dir).items())
        with open(os.path.join(conf, "log4j.properties"), "w") as f:
            f.write(LOG4J_PROPERTIES)
        worker = os.path.join(run_dir, "sdk_worker.sh")
        with open(worker, "w") as f:
            f.write(f'#!/bin/sh\nexec "{args.python}" -m pipelines.flink_worker "$@"\n')
        os.chmod(worker, 0o755)
        state = {
            "run_dir": run_dir, "beam": jars["beam"], "flink": jars["flink"], "ports": args.ports,
            "taskmanagers": args.taskmanagers, "slots": args.slots, "worker": worker,
            "jobserver": jars["jobserver"], "cluster": jars["cluster"], "components": {},
            "memory": {
                "jm": _memory_flags(jars["cluster"], conf, "GET_JM_RESOURCE_PARAMS"),
                "tm": _memory_flags(jars["cluster"], conf, "GET_TM_RESOURCE_PARAMS"),
            },
        }  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = []
    for name, command in commands(state).items():  # the JobManager first, then the TaskManagers, the job server
        if name in state["components"] and alive(state["components"][name]):
            continue
        state["components"][name] = _spawn(name, command, run_dir, env)
        started.append(name)
        _save_state(state)
    if started:
        _log(f"started {', '.join(started)} in {run_dir}")
    try:
        _wait_ready(state, args.timeout)
    except ClusterError:
        _stop({name: state["components"].pop(name) for name in started})
        _save_state(state)
        raise
    return state


def stop(run_dir: str) -> None:
    """Stop the recorded processes (the job server first, then the Flink JVMs), keeping the logs."""
    run_dir = os.path.abspath(run_dir)
    state = load_state(run_dir)
    if state is None:
        return
    components = state["components"]
    _stop({n: e for n, e in components.items() if n == "jobserver"})
    _stop({n: e for n, e in components.items() if n != "jobserver"})
    os.remove(os.path.join(run_dir, "state.json"))
    shutil.rmtree(os.path.join(run_dir, "tmp"), ignore_errors=True)  # each job's staged jars


def pipeline_options(state: dict) -> list[str]:
    """The Beam pipeline options that run a Python pipeline on this cluster."""
    return [
        "--runner=PortableRunner",
        f"--job_endpoint={HOST}:{state['ports']['job']}",
        "--environment_type=PROCESS",
        "--environment_config=" + json.dumps({"command": state["worker"]}, separators=(",", ":")),
        "--environment_cache_millis=60000",
        f"--parallelism={PARALLELISM}",
    ]


def status(run_dir: str) -> dict:
    """What runs, its ports, and the TaskManagers the JobManager knows (``{"running": False}`` when nothing does)."""
    state = load_state(os.path.abspath(run_dir))
    if state is None:
        return {"running": False, "run_dir": run_dir}
    result = {
        "running": all(alive(e) for e in state["components"].values()),
        "run_dir": state["run_dir"], "beam": state["beam"], "flink": state["flink"], "ports": state["ports"],
        "components": {n: {"pid": e["pid"], "alive": alive(e)} for n, e in state["components"].items()},
        "options": pipeline_options(state),
    }  # fmt: skip
    try:
        result["taskmanagers"] = [t["id"] for t in rest(state["ports"]["rest"], "/taskmanagers")["taskmanagers"]]
    except OSError as e:
        result["rest_error"] = str(e)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="beamcap-flink", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["start", "options", "status", "stop"])
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="config, state and logs (default: %(default)s)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="the jars, fetched once (default: %(default)s)")
    parser.add_argument("--taskmanagers", type=int, default=2, help="TaskManager JVMs (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=2, help="task slots per TaskManager (default: %(default)s)")
    parser.add_argument("--restart-attempts", type=int, default=3, help="restarts of a failed job (default: 3)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter SDK workers run (with beamcap)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for the cluster to be ready")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"(default: {port})")
    args = parser.parse_args(argv)
    args.ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    try:
        if args.command == "start":
            state = start(args)
            _log(f"ready: Flink {state['flink']} REST http://{HOST}:{state['ports']['rest']}, Beam {state['beam']} "
                 f"job server {HOST}:{state['ports']['job']}; logs in {state['run_dir']}/logs")  # fmt: skip
        elif args.command == "options":
            state = load_state(os.path.abspath(args.run_dir))
            if state is None:
                raise ClusterError(f"no cluster in {args.run_dir}: run beamcap-flink start first")
            print(" ".join(pipeline_options(state)))  # no spaces inside: fit for $(beamcap-flink options)
        elif args.command == "status":
            result = status(args.run_dir)
            print(json.dumps(result, indent=1))
            sys.exit(0 if result["running"] else 3)
        else:
            stop(args.run_dir)
    except ClusterError as e:
        print(f"beamcap-flink: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
