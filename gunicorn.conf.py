"""gunicorn settings of the status app: `gunicorn -c gunicorn.conf.py status_app:app`.

STATUS_BIND (host:port) says where to listen; else PORT (all interfaces, as platforms that set PORT expect);
else 127.0.0.1:8000. Command-line flags still win over this file.
"""
import os

# gunicorn puts its working directory (the project's) on sys.path before it reads this file.
from settings import load_settings_or_exit, setup_logging

bind = os.environ.get("STATUS_BIND") or (f"0.0.0.0:{os.environ['PORT']}" if os.environ.get("PORT") else
                                         "127.0.0.1:8000")

# Two processes of four threads: a slow /status or /metrics never keeps a load balancer's /health waiting.
workers = 2
worker_class = "gthread"
threads = 4  # web/sources.py's POOL_SIZE has a database connection for each
# Each worker opens its own pool at its first request; loading the app in the master would gain nothing.
preload_app = False
# gunicorn's runtime control socket lives at one path per user: several status apps on one host (or a test run
# beside a real one) would take it from each other, and nothing here needs it.
control_socket_disable = True

# /health answers within about two seconds even with the database or the broker gone (the app bounds it);
# a worker silent for longer than this is stuck and is replaced.
timeout = 15
graceful_timeout = 10
keepalive = 5  # seconds a probe's or a browser's idle connection is kept for its next request

accesslog = "-"
errorlog = "-"
loglevel = "info"
# client, method, path (without the query: /callback's carries a login's code and state), status, bytes,
# milliseconds taken, user agent
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms "%(a)s"'


def on_starting(server):
    """Refuse to start on a bad environment with one line naming the variable, as the other commands do."""
    load_settings_or_exit(need_esi=False)


def post_fork(server, worker):
    """Each worker logs the app's records with time, level and pid (the other commands' --verbose format)."""
    setup_logging(verbose=True)
