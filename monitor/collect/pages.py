"""Reading a paged list whole: a resource is complete only when its last page arrived."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from monitor.collect.errors import CollectError
from monitor.collect.http import Json
from monitor.collect.progress import Progress
from monitor.model.graph import ScopeState, ScopeStatus


class IncompleteList(CollectError):
    """A page failed after `fetched` items had arrived; `cause` says why."""

    def __init__(self, cause: CollectError, fetched: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.fetched = fetched

    def status(self) -> ScopeStatus:
        """The scope status of a resource whose list could not be read whole."""
        return ScopeStatus(ScopeState.FAILED, count=self.fetched, error=str(self.cause))


def read_all(
    pages: Iterable[list[Json]],
    progress: Progress,
    stage: str,
    keep: Callable[[Json], Json] | None = None,
) -> list[Json]:
    """Every item of every page (passed through `keep` if given); IncompleteList on failure."""
    items: list[Json] = []
    try:
        for page in pages:
            items.extend(page if keep is None else map(keep, page))
            progress(stage, len(items), None)
    except CollectError as exc:
        raise IncompleteList(exc, len(items)) from None
    return items
