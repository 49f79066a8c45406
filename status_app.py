"""The status app's entry: `gunicorn -c gunicorn.conf.py status_app:app`, or locally `python status_app.py --port
8000`. The app itself is the web/ package.
"""
from __future__ import annotations

import argparse
import sys

from settings import load_settings_or_exit, setup_logging
from web import create_app

app = create_app()


def main(argv: list[str] | None = None) -> int:
    """Serve the app with Flask's development server (gunicorn in production)."""
    parser = argparse.ArgumentParser(description="Serve /health, /status and /metrics locally "
                                                 "(in production: gunicorn -c gunicorn.conf.py status_app:app).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--verbose", action="store_true", help="log with time, level and pid")
    args = parser.parse_args(argv)
    settings = load_settings_or_exit(need_esi=False)
    setup_logging(verbose=args.verbose)
    create_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
