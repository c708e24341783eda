"""The profiling worker: a Celery app that profiles models and publishes head maps to Redis.

Run: ``celery -A worker.app worker -Q profiling -c 1``. It never imports ``services.inference``;
the two meet only in Redis (broker, result backend, head-map store).
"""
