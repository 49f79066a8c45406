"""Helpers of the fault-injection tests: workers whose output is read as it comes, broker and database faults.

Not a conftest.py on purpose: two conftest.py without a package would both be the module `conftest`. The fixtures
of tests/conftest.py (database_url, conn, queue_name, sim) reach this directory anyway; the helpers every test
shares are imported from tests/helpers.py.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import pika
import psycopg
import pytest

import broker
import db
import sync
from helpers import (  # noqa: F401
    RABBITMQ_URL,
    ROOT,
    make_settings,
    queue_counts,
    record_output,
    run_script,
    settings_env,
    wait_until,
)

RABBITMQCTL_TIMEOUT = 60
# Detail fetches a lost database connection makes twice because of sync.fetch_killmails, not the worker:
# The worker's --verbose format: "<date> <time> <LEVEL> [<pid>] <logger>: <message>"
LOG_LINE = re.compile(r"^\S+ \S+ (\w+) \[(\d+)\] (\S+): (.*)$")


def refetch_bound(settings) -> int:
    """Details one interrupted job can have fetched without saving them, so that its rerun fetches them again:
    a full save batch, plus the fetches its pool finished ahead of the batch (concurrency - 1) and the ones
    running (concurrency)."""
    return sync.SAVE_BATCH + 2 * settings.detail_concurrency - 1


def faults_line(test: str, **figures) -> str:
    """Print the one-line summary of a fault test (visible with -s) and return it."""
    line = "FAULTS: " + test + " " + " ".join(f"{k}={v}" for k, v in figures.items())
    print("\n" + line, flush=True)
    return line


class Worker:
    """killmail_worker.py in a subprocess (its own process group), its --verbose log read by a thread as it
    comes, so a long run never blocks on a full pipe and the test can see which child is doing what."""

    def __init__(self, settings, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "killmail_worker.py"), "--verbose", *args], cwd=ROOT,
            env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.pid = self.proc.pid
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            record_output(line)  # for the secret-leak check, like every output a test reads
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def output(self) -> str:
        return "\n".join(self.lines())

    def count(self, text: str) -> int:
        """How many log lines contain this text."""
        return sum(text in line for line in self.lines())

    def jobs(self) -> dict[int, dict]:
        """Per child pid, its current job: {'character': id, 'phase': 'start'|'details'|'saved'}; a child
        whose last job ended is absent."""
        current: dict[int, dict] = {}
        for line in self.lines():
            match = LOG_LINE.match(line)
            if not match:
                continue
            pid, message = int(match[2]), match[4]
            if "👤 Processing:" in message:
                found = re.search(r"\(ID: (\d+)\)", message)
                current[pid] = {"character": int(found[1]) if found else None, "phase": "start", "found": 0}
            elif pid in current and "📥 Found" in message:
                current[pid].update(phase="details", found=int(re.search(r"Found (\d+)", message)[1]))
            elif pid in current and "✅ Saved:" in message:
                current[pid]["phase"] = "saved"
            elif "✅ Completed:" in message or "❌ Failed:" in message or "🔒" in message:
                current.pop(pid, None)
        return current

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True,
                             timeout=10).stdout
        return [int(p) for p in out.split()]

    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Wait for the exit (a TimeoutExpired fails the test) and for the rest of the output."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill_group(self) -> None:
        """SIGKILL the worker and every child it forked (the process group this test made), if still there."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# Named fixture_*, as pytest suggests, so that the tests importing a fixture can take it by its name as an
# argument without shadowing the import.
@pytest.fixture(name="workers")
def fixture_workers():
    """Start workers with workers(settings, *args); any still running at the end are killed with their
    children, so a failed test leaves no process behind."""
    started: list[Worker] = []

    def start(settings, *args: str) -> Worker:
        worker = Worker(settings, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill_group()


@pytest.fixture(name="fast")
def fixture_fast(sim):
    """The simulator with a detail bucket too big to pace against: pacing is tested in test_limits."""
    sim.configure(detail_bucket=(2_000_000, 900))
    return sim


def fault_settings(database_url, sim, queue_name, **overrides):
    """Settings for a fault run: short retry delays, three children per worker unless told otherwise."""
    values = dict(queue_name=queue_name, prefetch_count=3, retry_base_seconds=1)
    values.update(overrides)
    return make_settings(database_url, sim.base_url, **values)


def queue_all(settings) -> int:
    """Run the producer once; returns how many jobs it queued (users and corporations)."""
    done = run_script("queue_killmails.py", settings, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return sum(int(n) for n in re.findall(r"✓ Found (\d+)", done.stdout))


def publish_raw(queue_name: str, settings, *bodies: bytes) -> None:
    """Publish message bodies as they are (poison messages, duplicate jobs) to the job queue."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        broker.declare_topology(channel, queue_name, max_attempts=settings.max_attempts)
        for body in bodies:
            broker.publish(channel, queue_name, body)
    finally:
        connection.close()


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def broker_queue_state(*queues: str) -> dict[str, tuple[int, int]]:
    """(messages_ready, messages_unacknowledged) per queue, as the broker itself reports them."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                      "messages_unacknowledged")
    state = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in queues:
            state[parts[0]] = (int(parts[1]), int(parts[2]))
    return state


def broker_answers(url: str = RABBITMQ_URL) -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def sessions(admin, keep: set[int]) -> set[int]:
    """The pids of every other client session of this test's database (not autovacuum's)."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' "
        "AND pid <> pg_backend_pid() AND NOT (pid = ANY(%s))", (list(keep),)).fetchall()
    return {pid for (pid,) in rows}


def terminate_backends(admin, keep: set[int]) -> set[int]:
    """pg_terminate_backend every other client session of this test's database; returns the pids of those
    ended."""
    rows = admin.execute("SELECT pid, pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                         (sorted(sessions(admin, keep)),)).fetchall()
    return {pid for pid, ended in rows if ended}


def admin_connection(database_url: str) -> psycopg.Connection:
    return psycopg.connect(database_url, autocommit=True)


def stored(conn) -> dict[int, tuple[int, int]]:
    """killmail id -> (attacker rows, item rows) stored."""
    rows = conn.execute(
        "SELECT k.killmail_id, (SELECT count(*) FROM attackers a WHERE a.killmail_id = k.killmail_id) AS a, "
        "(SELECT count(*) FROM killmail_items i WHERE i.killmail_id = k.killmail_id) AS i FROM killmails k"
    ).fetchall()
    conn.commit()
    return {r["killmail_id"]: (r["a"], r["i"]) for r in rows}


def stored_count(conn) -> int:
    n = conn.execute("SELECT count(*) AS n FROM killmails").fetchone()["n"]
    conn.commit()
    return n


def rows_of(body: dict) -> tuple[int, int]:
    """(attacker rows, item rows) a killmail body must become: every attacker, every item and container item."""
    items = body["victim"].get("items", [])
    return len(body["attackers"]), sum(1 + len(i.get("items", [])) for i in items)


def check_stored(conn, sim) -> dict:
    """Compare the database with the simulator: every expected killmail stored whole, nothing extra, nothing
    twice. Kills of revoked pilots may be stored (through a corporation list) but need not be."""
    expected = sim.expected_killmails(valid_only=True)
    reachable = sim.expected_killmails(valid_only=False, corporations=True)
    got = stored(conn)
    rows = conn.execute("SELECT count(*) AS n, count(DISTINCT killmail_id) AS d FROM killmails").fetchone()
    conn.commit()
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(reachable))
    partial = sorted(i for i in got if i in reachable and got[i] != rows_of(reachable[i]))
    return {"expected": len(expected), "stored": len(got), "duplicated": rows["n"] - rows["d"],
            "missing": missing, "extra": extra, "partial": partial}


def assert_all_stored(conn, sim) -> dict:
    check = check_stored(conn, sim)
    assert check["missing"] == [], f"{len(check['missing'])} expected killmails not stored"
    assert check["extra"] == [] and check["partial"] == [] and check["duplicated"] == 0, check
    return check


def overlapping_runs(conn) -> list[dict]:
    """Pairs of sync runs of one character whose [started_at, finished_at] intervals overlap (locked skips,
    which sync nothing, left out). A corporation run holds its director's lock too, so it counts."""
    return conn.execute(
        """
        SELECT a.character_id, a.id AS first, b.id AS second, a.kind || '/' || a.status || ' ' || a.worker AS a,
               b.kind || '/' || b.status || ' ' || b.worker AS b,
               extract(epoch FROM LEAST(a.finished_at, b.finished_at) - GREATEST(a.started_at, b.started_at))::float8
                   AS overlap_seconds
        FROM sync_runs a JOIN sync_runs b
          ON a.character_id = b.character_id AND a.id < b.id
         AND a.started_at < b.finished_at AND b.started_at < a.finished_at
        WHERE a.status <> 'locked' AND b.status <> 'locked'
          AND a.finished_at IS NOT NULL AND b.finished_at IS NOT NULL
        """
    ).fetchall()


def users_idle(conn) -> bool:
    """No user is claimed by the producer (each queued job has finished)."""
    n = conn.execute("SELECT count(*) AS n FROM users WHERE queued_at IS NOT NULL").fetchone()["n"]
    conn.commit()
    return n == 0


def per_pid(lines: list[str], text: str) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for line in lines:
        match = LOG_LINE.match(line)
        if match and text in match[4]:
            counts[int(match[2])] += 1
    return dict(counts)


# ---------------------------------------------------------------------------------------------- own PostgreSQL

PG_TIMEOUT = 60  # seconds pg_ctl waits for a start, stop or restart


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (Debian's layout), or None."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
             if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, default=None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OwnPostgres:
    """A PostgreSQL cluster of a test's own: initdb in a temporary directory, trust authentication, listening on a
    free port of 127.0.0.1 with its socket in that directory. A test may restart it: the shared server, which
    other developers' tests and CI use at the same time, is never touched."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.home = Path(tempfile.mkdtemp(prefix="killmails-pg-"))
        self.data = self.home / "data"
        self.port = free_port()
        self.url = f"postgresql://root@127.0.0.1:{self.port}/killmails"
        # initdb refuses to run as root: the server runs as the postgres user then, which owns the directory.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.home, "postgres", "postgres")

    def _run(self, program: str, *args: str) -> str:
        done = subprocess.run([*self.as_user, str(self.bindir / program), *args], capture_output=True, text=True,
                              timeout=PG_TIMEOUT + 30)
        assert done.returncode == 0, f"{program} {' '.join(args)}: {done.stdout}{done.stderr}{self.log()}"
        return done.stdout

    def _ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.home / "server.log"), "-w",
                  "-t", str(PG_TIMEOUT), "-o", options, *args)

    def log(self) -> str:
        path = self.home / "server.log"
        return "\n" + path.read_text()[-3000:] if path.exists() else ""

    def start(self) -> None:
        """Make the cluster, start it and wait until it accepts connections; make the database and its schema."""
        self._run("initdb", "-D", str(self.data), "-U", "root", "-A", "trust", "-E", "UTF8", "--no-sync")
        for tries in range(1, 4):
            try:
                self._ctl("start")
                break
            except AssertionError:
                if tries == 3:
                    raise
                self.port = free_port()  # another process took the free port meanwhile
                self.url = f"postgresql://root@127.0.0.1:{self.port}/killmails"
        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE killmails")
        with db.connect(self.url) as conn:
            db.apply_schema(conn)
            conn.commit()

    def restart(self) -> None:
        """pg_ctl restart -m fast: every session ended, the server down, then up again (waited for)."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m",
                            "immediate", "-w"], capture_output=True, timeout=PG_TIMEOUT + 30)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(name="own_postgres")
def fixture_own_postgres():
    """A running PostgreSQL cluster of this test's own, with the schema applied; gone after the test."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl under /usr/lib/postgresql/*/bin) are not "
                    "installed: no cluster of the test's own to restart")
    cluster = OwnPostgres(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def answer_or_false(url: str, query):
    """query(conn) on a new connection to `url`, or False while the server does not answer (a restart)."""
    try:
        with db.connect(url, connect_timeout=5) as conn:
            return query(conn)
    except psycopg.OperationalError:
        return False


# ---------------------------------------------------------------------------------------------- own RabbitMQ

RABBIT_TIMEOUT = 60  # seconds a node start or an app restart may take


class OwnRabbit:
    """A RabbitMQ node of a test's own (its name, port, data and logs in a temporary directory): a test may stop and
    start it with `rabbitmqctl stop_app` while the shared broker, which other tests and developers use, is never
    touched. RabbitMQ's scripts run the node as the rabbitmq user, which owns the directory."""

    def __init__(self):
        self.home = Path(tempfile.mkdtemp(prefix="killmails-rabbit-"))
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"killmails{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        (self.home / "enabled_plugins").write_text("[].\n")
        (self.home / "rabbitmq-env.conf").write_text("")
        (self.home / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                                                 "loopback_users = none\n")
        if os.geteuid() == 0:
            shutil.chown(self.home, "rabbitmq", "rabbitmq")
            for path in self.home.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
                    "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
                    "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"), "RABBITMQ_LOG_BASE": str(self.home / "log"),
                    "RABBITMQ_PID_FILE": str(self.home / "pid"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins")}

    def ctl(self, *args: str) -> str:
        done = subprocess.run(["rabbitmqctl", "-n", self.node, *args], capture_output=True, text=True,
                              env=self.env, timeout=RABBIT_TIMEOUT + 30)
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def start(self) -> None:
        """Start the node and wait until it takes connections."""
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=RABBIT_TIMEOUT,
                       capture_output=True)
        self.ctl("wait", str(self.home / "pid"), "--timeout", str(RABBIT_TIMEOUT))

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")

    def stop(self) -> None:
        """Stop the node and remove its directory."""
        subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], env=self.env, capture_output=True,
                       timeout=RABBIT_TIMEOUT + 30)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(name="own_rabbit")
def fixture_own_rabbit():
    """A running RabbitMQ node of this test's own; gone after the test."""
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed: no broker of the test's own to restart")
    node = OwnRabbit()
    try:
        node.start()
        yield node
    finally:
        node.stop()
