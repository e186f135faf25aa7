"""One lock per registered model, across processes and machines: a Prefect global concurrency limit of one slot.

Registering a model version (find-or-create by model fingerprint) and moving its `champion` alias both happen
under `promotion_lock(name)`, so two overlapping runs of one category never both register the same model nor
both promote against a stale champion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# How long a promotion waits for another promotion of the same model (re-scoring a champion takes minutes).
PROMOTION_LOCK_TIMEOUT_S = 3600.0


def promotion_lock_name(name: str) -> str:
    return f"promote-{name}"


@contextlib.contextmanager
def promotion_lock(name: str, timeout_seconds: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit `promote-<name>` for the block.

    Prefect 3.8's `concurrency()` *skips* a limit that does not exist (a warning, no lock), so the limit is
    created first (one slot; an existing one is used as it is, and refused if it is inactive or has more than
    one slot) and acquired with `strict=True`. The slot is leased and renewed while held; a killed holder's
    lease expires on the server, so a crashed run does not block promotions for ever.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit_name = promotion_lock_name(name)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(limit_name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name, limit=1))
            except ObjectAlreadyExists:  # another run created it at the same moment
                pass
            limit = client.read_global_concurrency_limit_by_name(limit_name)
    if limit.limit != 1 or not limit.active:
        raise RuntimeError(f"the Prefect concurrency limit {limit_name!r} must be active with 1 slot to serialise "
                           f"promotions (it has limit={limit.limit}, active={limit.active})")
    with concurrency(limit_name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
