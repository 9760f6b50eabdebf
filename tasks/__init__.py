"""Celery glue: one task per stage, the chain builder, the retry policy. No media logic here."""
