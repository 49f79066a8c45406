"""What every bench scenario needs: a database and queue of its own, the ESI simulator, the project's commands
run as operators run them (subprocesses with an environment), and a look at the worker children's memory."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pika
import psycopg

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT / "devtools", ROOT):  # the simulator, and the project's modules (first on the path)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import broker  # noqa: E402
import db  # noqa: E402
from esi_simulator import Simulator  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_ADMIN_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"
USER_AGENT = "killmail-worker-bench/1.0 (bench@example.org)"
MAX_ATTEMPTS = 8
LOG_DIR = Path(tempfile.gettempdir()) / "killmail-bench"
TICKS = os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat's CPU times are in these


class BenchError(Exception):
    """A scenario could not be measured (a command failed, a deadline passed)."""


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str, every: float = 0.1) -> object:
    """Poll a condition until it holds; raise BenchError naming it when the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


# Linux folds the peak RSS of the process a command was forked from into the command's own ru_maxrss (at its exec):
# run straight from the bench, whose worlds make it hundreds of MB, a command's peak would read as the bench's. A
# small launcher process forks the command instead and reports its rusage, with only the launcher's few MB folded in.
_LAUNCHER = """
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.monotonic()
_, status, usage = os.wait4(os.posix_spawn(argv[0], argv, os.environ), 0)
with open(report, "w") as out:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - started,
               "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}, out)
"""


def run_measured(argv: list[str], *, env: dict[str, str], output) -> dict:
    """Run a command to its end, its output to `output`: its exit status, wall seconds from its launch to its exit,
    CPU seconds (user + system) and peak RSS (ru_maxrss), through the launcher above."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as report:
        subprocess.run([sys.executable, "-c", _LAUNCHER, report.name, *argv], env=env, cwd=ROOT, stdout=output,
                       stderr=subprocess.STDOUT, check=True)
        return json.load(report)


def rss_mb(pid: int, *, field: str = "VmRSS") -> float | None:
    """A process's resident set (VmRSS; VmHWM: its peak) in MB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children_of(pid: int) -> list[int]:
    """The pids whose parent is pid (a worker's forked children). Read from /proc, not from `ps`: the memory
    soak asks twice a second beside the scenarios that measure speed, and a `ps` each time cost CPU they need."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    children: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                children += [int(p) for p in listed.read().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return children


def cpu_ticks(pid: int | None) -> int | None:
    """User + system clock ticks a process has spent (all its threads), None when it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def worker_pids(parents: list[int]) -> list[int]:
    """Worker parents and their forked children."""
    return [*parents, *(child for parent in parents for child in children_of(parent))]


@contextmanager
def profiled(pid: int, path: Path | None, *, gil: bool = False) -> Iterator[None]:
    """`py-spy record --subprocesses` on a worker parent and its children while the block runs, into `path`
    (speedscope format); nothing when path is None. With `gil`, only samples where a thread holds the GIL: the
    Python code's CPU, not its waits. The profiled processes spend more CPU meanwhile."""
    if path is None:
        yield
        return
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, which a bench run need not have on PATH
    command = [str(beside) if beside.exists() else "py-spy", "record", "--subprocesses", "--nonblocking",
               "--format", "speedscope", "--output", str(path), "--pid", str(pid), *(["--gil"] if gil else [])]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(timeout=120)


class Worker:
    """One `killmail_worker.py` process (the parent; it forks PREFETCH_COUNT children), its output in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "killmail_worker.py"), *args], cwd=ROOT,
                                        env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """The forked children now alive."""
        return children_of(self.pid)

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit by itself (burst mode); BenchError if it does not in time or fails."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise BenchError(f"worker {self.pid} still running after {timeout:.0f} s (log: {self.log_path})") from exc
        self._log.close()
        if code != 0:
            raise BenchError(f"worker exited with {code} (log: {self.log_path})")
        return code

    def stop(self, *, timeout: float = 60) -> int | None:
        """SIGTERM (finish running jobs, ack, exit); what is still running after the timeout is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """Stop now: a second SIGTERM makes the parent SIGKILL its children; then the parent itself goes."""
        if self.process.poll() is None:
            children = self.children()
            self.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for child in children:  # a child the parent could not reach
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


class MemoryWatch:
    """Samples the RSS of the children of some worker parents in a background thread."""

    def __init__(self, parents: list[int], *, every: float = 1.0):
        self.parents = parents
        self.every = every
        self.samples: list[tuple[float, int, float]] = []  # (monotonic time, child pid, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[int, float]:
        """Read every child's RSS now; returns pid -> MB."""
        now, seen = time.monotonic(), {}
        for parent in self.parents:
            for child in children_of(parent):
                mb = rss_mb(child)
                if mb is not None:
                    seen[child] = mb
                    self.samples.append((now, child, mb))
        return seen

    def peak_by_child(self) -> dict[int, float]:
        """The highest RSS seen per child."""
        peaks: dict[int, float] = {}
        for _, pid, mb in self.samples:
            peaks[pid] = max(mb, peaks.get(pid, 0.0))
        return peaks

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()


@dataclass
class Lab:
    """One scenario's world: its own database, queue names and (usually) a running simulator."""

    name: str
    database_url: str
    queue: str
    sim: Simulator | None
    workers: list[Worker] = field(default_factory=list)
    _polling: psycopg.Connection | None = field(default=None, repr=False)

    def connect(self, **kwargs) -> psycopg.Connection:
        """A connection to this scenario's database (rows are dicts)."""
        return db.connect(self.database_url, **kwargs)

    def env(self, *, prefetch: int = 5, detail_concurrency: int | None = None, sync_interval: int = 300,
            retry_base: int = 5) -> dict[str, str]:
        """The environment that points the project's commands at this scenario."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DATABASE_", "RABBITMQ_", "ESI_", "EVE_", "SSO_", "QUEUE_", "PREFETCH_",
                                    "DETAIL_", "SYNC_", "MAX_", "RETRY_"))}
        base = self.sim.base_url if self.sim else "http://127.0.0.1:9"
        env.update({
            "DATABASE_URL": self.database_url, "RABBITMQ_URL": RABBITMQ_URL, "QUEUE_NAME": self.queue,
            "PREFETCH_COUNT": str(prefetch), "ESI_BASE_URL": base, "SSO_TOKEN_URL": f"{base}/v2/oauth/token",
            "EVE_CLIENT_ID": CLIENT_ID, "EVE_CLIENT_SECRET": CLIENT_SECRET, "ESI_USER_AGENT": USER_AGENT,
            "SYNC_INTERVAL_SECONDS": str(sync_interval), "MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "RETRY_BASE_SECONDS": str(retry_base), "PYTHONUNBUFFERED": "1",
        })
        if detail_concurrency is not None:
            env["DETAIL_CONCURRENCY"] = str(detail_concurrency)
        return env

    def run_producer(self, *args: str, **env_options) -> subprocess.CompletedProcess:
        """Run `queue_killmails.py` once (with these arguments), as cron does; BenchError if it fails."""
        done = subprocess.run([sys.executable, str(ROOT / "queue_killmails.py"), *args], cwd=ROOT,
                              env=self.env(**env_options), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise BenchError(f"producer exited with {done.returncode}: {done.stderr or done.stdout}")
        return done

    def start_worker(self, *args: str, **env_options) -> Worker:
        """Start one `killmail_worker.py` with these arguments (e.g. --burst)."""
        LOG_DIR.mkdir(exist_ok=True)
        log_path = LOG_DIR / f"{self.queue}-worker{len(self.workers) + 1}.log"
        worker = Worker(self.env(**env_options), log_path, *args)
        self.workers.append(worker)
        return worker

    def start_ready_worker(self, *, prefetch: int, **env_options) -> Worker:
        """Start a worker as a service runs (no --burst) and wait until all its children consume the queue."""
        worker = self.start_worker(prefetch=prefetch, **env_options)
        wait_until(lambda: consumers(self.queue) >= prefetch, timeout=60, what=f"{prefetch} consumers",
                   every=0.05)
        return worker

    def start_ready_workers(self, count: int, *, prefetch: int, **env_options) -> list[Worker]:
        """Start `count` workers as services run and wait until all their children consume the queue."""
        workers = [self.start_worker(prefetch=prefetch, **env_options) for _ in range(count)]
        wait_until(lambda: consumers(self.queue) >= count * prefetch, timeout=60,
                   what=f"{count * prefetch} consumers", every=0.05)
        return workers

    def stored_by(self, expected: int, *, timeout: float) -> float | None:
        """Poll until `expected` killmails are stored; the Unix time it was seen (every commit before it), or None
        when the timeout passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count("SELECT count(*) FROM killmails") >= expected:
                return time.time()
            time.sleep(0.02)
        return None

    def queue_and_drain(self, *, prefetch: int, **env_options) -> int:
        """Run the producer once and wait until the running workers recorded a run for every job it queued;
        returns how many it queued."""
        runs_before = self.count("SELECT count(*) FROM sync_runs")
        jobs = queued_jobs(self.run_producer(prefetch=prefetch, **env_options).stdout)
        wait_until(lambda: self.count("SELECT count(*) FROM sync_runs") - runs_before >= jobs, timeout=300,
                   what=f"{jobs} sync runs", every=0.02)
        return jobs

    def last_commit(self) -> float:
        """When the last sync run was recorded (its finished_at, as a Unix time)."""
        with self.connect() as conn:
            return conn.execute("SELECT max(finished_at) AS t FROM sync_runs").fetchone()["t"].timestamp()

    def insert_users(self, pilots: list[dict]) -> None:
        """Write users as the web app does at login: only its five columns."""
        with self.connect() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(p["character_id"], p["character_name"], p["access_token"], p["refresh_token"],
                      p["expires_at"]) for p in pilots])

    def count(self, sql: str) -> int:
        """The single number a counting query returns. One connection serves every count: waits poll this every
        few ms, and a new connection each time would cost PostgreSQL a process start, CPU the measured run
        needs."""
        if self._polling is None or self._polling.closed:
            self._polling = self.connect(autocommit=True)
        return list(self._polling.execute(sql).fetchone().values())[0]

    def column(self, sql: str) -> list:
        """The first column of every row a query returns, on the same connection as count()."""
        if self._polling is None or self._polling.closed:
            self._polling = self.connect(autocommit=True)
        return [next(iter(row.values())) for row in self._polling.execute(sql).fetchall()]

    def close(self) -> None:
        """Close the polling connection."""
        if self._polling is not None:
            self._polling.close()

    def advance_world(self, seconds: float) -> None:
        """Let `seconds` pass for everything that follows the simulator's clock: the simulator itself, and the
        times the worker stored from it (token expiry, list Expires, last sync of pilots and corporations)."""
        self.sim.advance(seconds)
        shift = {"s": timedelta(seconds=seconds)}
        with self.connect() as conn:
            conn.execute("UPDATE users SET expires_at = expires_at - %(s)s, last_sync_at = last_sync_at - %(s)s, "
                         "list_expires_at = list_expires_at - %(s)s", shift)
            conn.execute("UPDATE corporations SET last_sync_at = last_sync_at - %(s)s, "
                         "list_expires_at = list_expires_at - %(s)s", shift)

    def make_due(self) -> None:
        """Make every pilot and corporation due now (last sync an hour back), leaving their list Expires alone."""
        with self.connect() as conn:
            conn.execute("UPDATE users SET last_sync_at = last_sync_at - interval '1 hour'")
            conn.execute("UPDATE corporations SET last_sync_at = last_sync_at - interval '1 hour'")


@contextmanager
def lab(name: str, *, seed: int = 2026, sim_options: dict | None = None, world: dict | None = None,
        simulator: bool = True) -> Iterator[Lab]:
    """A scenario's database (created, schema applied, dropped after), queue names (deleted after) and simulator
    (with `world` passed to add_pilots, its pilots written to users)."""
    tag = f"{name}_{uuid.uuid4().hex[:8]}"
    database = f"killmails_bench_{tag}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + database
    sim = None
    here = Lab(name, url, f"bench_{tag}", None)
    try:
        with db.connect(url) as conn:
            db.apply_schema(conn)
        if simulator:
            sim = Simulator(seed=seed, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **(sim_options or {}))
            if world:
                sim.add_pilots(**world)
            sim.start(port=0)
            here.sim = sim
            here.insert_users(sim.pilots())
        yield here
    finally:
        here.close()
        for worker in here.workers:
            worker.kill()
        if sim is not None:
            sim.stop()
        try:
            delete_queues(here.queue)
        finally:  # a broker that went away must not leave the database behind
            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def delete_queues(queue: str) -> None:
    """Delete a job queue with its retry and dead-letter queues."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for name in [queue, broker.dead_queue(queue)] + [broker.retry_queue(queue, n) for n in range(1, MAX_ATTEMPTS)]:
        channel.queue_delete(name)
    connection.close()


def queue_depth(queue: str) -> int:
    """Messages ready in a queue (0 when it does not exist)."""
    return _queue_counts(queue)[0]


def consumers(queue: str) -> int:
    """Consumers of a queue (0 when it does not exist)."""
    return _queue_counts(queue)[1]


def _queue_counts(queue: str) -> tuple[int, int]:
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        method = connection.channel().queue_declare(queue, passive=True).method
        return method.message_count, method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0, 0
    finally:
        if connection.is_open:
            connection.close()


def queued_jobs(producer_output: str) -> int:
    """How many jobs (pilots and corporations) the producer says it queued."""
    users = re.search(r"All (\d+) users queued", producer_output)
    corporations = re.search(r"And (\d+) corporations", producer_output)
    if users is None:
        raise BenchError(f"cannot read what the producer queued: {producer_output[-300:]}")
    return int(users[1]) + (int(corporations[1]) if corporations else 0)


def check_services() -> str | None:
    """One line naming the service that does not answer, or None when both do."""
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=5).close()
    except psycopg.OperationalError:
        return f"PostgreSQL is not reachable at {ADMIN_URL} (make services)"
    try:
        pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL)).close()
    except pika.exceptions.AMQPError:
        return f"RabbitMQ is not reachable at {RABBITMQ_URL} (make services)"
    return None
