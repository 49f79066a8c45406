"""demo.py --serve (`make demo-serve`) as a newcomer runs it: it serves /status and /login until Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import psycopg

from helpers import ADMIN_URL, ROOT, record_output
from screenshot import delete_queues, free_port, wait_until_answering


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_demo_serve_serves_status_and_login_until_ctrl_c():
    name, queue, port = f"killmails_test_demo_{uuid.uuid4().hex[:8]}", f"test_demo_{uuid.uuid4().hex[:8]}", free_port()
    env = dict(os.environ, DEMO_DATABASE_NAME=name, DEMO_SERVE_QUEUE_NAME=queue, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "devtools.demo", "--serve", "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = []
        while not any("Ctrl-C stops everything" in line for line in printed):
            line = process.stdout.readline()
            assert line, "".join(printed)
            record_output(line)  # for the leak check, as communicate's output is
            printed.append(line)
        base = f"http://127.0.0.1:{port}"
        assert f"{base}/status" in "".join(printed) and f"{base}/login" in "".join(printed)
        wait_until_answering(f"{base}/health", process, deadline=30)
        try:
            urllib.request.build_opener(NoRedirect).open(f"{base}/login", timeout=5)
            raise AssertionError("/login did not redirect")
        except urllib.error.HTTPError as answer:
            assert answer.code == 302 and "/v2/oauth/authorize?" in answer.headers["Location"]
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=90)
        assert process.returncode == 0, rest
        assert "Stopped" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        delete_queues(queue, max_attempts=8)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}_serve" WITH (FORCE)')


def test_demo_names_an_unreachable_service_without_its_password(monkeypatch):
    import demo
    monkeypatch.setattr(demo, "RABBITMQ_URL", "amqp://guest:demo-SECRET-7@127.0.0.1:1/%2F")
    assert demo.check_services().startswith("❌ RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/%2F;")
    monkeypatch.setattr(demo, "ADMIN_URL", "postgresql://root:demo-SECRET-8@127.0.0.1:1/postgres")
    assert demo.check_services().startswith("❌ PostgreSQL is not reachable at postgresql://root:***@127.0.0.1:1/")
