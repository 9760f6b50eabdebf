"""Pure media work: probe, validate, stages, profiles, the ffmpeg runner.

Nothing here imports Django or Celery, so the same functions run in a worker, in
``manage.py process`` and in a bare test.
"""
