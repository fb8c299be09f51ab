"""Microsoft Graph: the organization and the directory users, with few calls."""

from __future__ import annotations

from collections.abc import Iterator

from monitor.collect.errors import PageError
from monitor.collect.http import ApiClient, Json
from monitor.model.users import GRAPH_USER_FIELDS

ORGANIZATION = "graph:/organization"
USERS = "graph:/users"


class GraphClient:
    """Typed Graph v1.0 calls."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def organization(self) -> Json:
        """The tenant's organization object (Organization.Read.All)."""
        body = self.api.get_json(
            ORGANIZATION, "/v1.0/organization", permission="Organization.Read.All"
        )
        value = body.get("value")
        if not isinstance(value, list) or not value or not isinstance(value[0], dict):
            raise PageError(ORGANIZATION, "no organization in the response", status=200)
        return value[0]

    def iter_user_pages(self, top: int = 999, *, managers: bool = False) -> Iterator[list[Json]]:
        """Users, a page at a time: `$select`, `$top=999`, following `@odata.nextLink`.

        `managers`: also `$expand=manager($select=id)` (Graph then pages by at most 100)."""
        params: dict[str, str | int] = {"$select": ",".join(GRAPH_USER_FIELDS), "$top": top}
        if managers:
            params["$expand"] = "manager($select=id)"
        yield from self.api.iter_next_link_pages(
            USERS, "/v1.0/users", params, permission="Directory.Read.All"
        )
