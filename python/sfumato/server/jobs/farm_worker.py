"""``sfumato worker``: a process on any machine that runs the jobs of a PostgreSQL job
store that ``sfumato serve`` front ends share.

It registers itself (id, host, the models in its folders, those it has loaded),
claims only jobs for models it serves, preferring those it has loaded, renews its
leases while a job runs, and stores each job's images in the database, so that
any front end serves them. SIGTERM or Ctrl-C stops it: its running job goes back
to the queue.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from sfumato.errors import SfumatoError
from sfumato.server.jobs import open_store
from sfumato.server.jobs.runner import JobRunner, check_runner
from sfumato.server.jobs.store_pg import URL_SCHEMES, describe
from sfumato.server.models.catalog import Catalog
from sfumato.server.settings import ServerSettings

logger = logging.getLogger("sfumato.server")


def check(settings: ServerSettings) -> None:
    """Refuse, naming the flag, what a worker cannot run with.

    Raises
    ------
    SfumatoError
        For a store that is not PostgreSQL, a lease or a job count that is not positive.
    """
    if not settings.store or not settings.store.startswith(URL_SCHEMES):
        raise SfumatoError(
            "--store: sfumato worker takes jobs from a PostgreSQL store that sfumato serve front ends share: "
            "--store postgresql://... (or SFUMATO_STORE)"
        )
    check_runner(settings)


def work(settings: ServerSettings, stop: threading.Event | None = None) -> None:
    """Run a worker until ``stop`` is set (by default: until SIGTERM or SIGINT).

    Raises
    ------
    SfumatoError
        For settings a worker cannot run with (:func:`check`), a malformed store
        URL, or a models config that cannot be served.
    """
    check(settings)
    catalog = Catalog(settings)
    catalog.configured()
    store = open_store(settings.store, settings.db_path, settings.queue_size)
    runner = JobRunner(store, catalog, settings, lease_s=settings.lease_s, jobs=settings.jobs_per_device)
    if stop is None:
        stop = threading.Event()

        def stopping(_signal: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, stopping)
        signal.signal(signal.SIGINT, stopping)
    models, _loaded = runner.served()
    print(
        f"sfumato worker {runner.id}: jobs from {describe(settings.store or '')}\n"
        f"{len(models)} model(s) served from {settings.models_dir}: {', '.join(models) or 'none (it takes no job)'}",
        file=sys.stderr,
        flush=True,
    )
    runner.start()
    try:
        stop.wait()
    finally:
        runner.stop()
        store.close()
