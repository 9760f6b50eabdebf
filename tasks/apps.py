from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Processing tasks"

    def ready(self) -> None:
        from celery.signals import worker_process_init

        worker_process_init.connect(_start_sandbox, weak=False, dispatch_uid="tasks.start_sandbox")


def _start_sandbox(**_: object) -> None:
    """Start the pool process's sandbox fork server now, while the process waits for its first
    task, rather than on that task's first decode (an interpreter start: ~0.5 s)."""
    from pipelines import sandbox

    sandbox.fork_server()
