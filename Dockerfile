# One image for the producer, the worker and the status app; the command picks which.
FROM python:3.11-slim
WORKDIR /app
# Every package at the version and with the hashes of the lock (`make lock`), transitive ones too.
COPY requirements.lock .
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
# The top level's modules only: the ESI simulator and the demo live in devtools/ and never ship.
COPY *.py schema.sql gunicorn.conf.py ./
COPY web ./web
RUN groupadd --system --gid 10001 killmail && useradd --system --uid 10001 --gid 10001 killmail
# Numeric, so that Kubernetes' runAsNonRoot can check it. The root filesystem may be read-only: no .pyc is written.
USER 10001:10001
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
CMD ["python", "killmail_worker.py"]
