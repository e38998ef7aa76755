"""Lists that page: GET /v1/principals and GET /v1/grants take `limit` and `cursor` and answer
`next_cursor`; a cursor is checked; a query parameter an endpoint does not take is refused.

Many rows are arranged with SQL, in groups of seven that share a created_at (as rows written in one
transaction do), so that pages end inside a group and the order's tie-break is exercised too.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.conftest import Actors, assert_error, bearer, create_principal

BASE_TIME = datetime(2020, 1, 1, tzinfo=UTC)  # before the seed's rows


def created_at(n: int) -> datetime:
    return BASE_TIME + timedelta(seconds=n // 7)


def add_principals(db: psycopg.Connection[Any], count: int) -> None:
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO principals (id, name, role, created_at) VALUES (%s, %s, 'service', %s)",
            [(uuid.uuid4(), f"bulk-{n:03d}", created_at(n)) for n in range(count)],
        )


def add_grants(db: psycopg.Connection[Any], grantees: list[str], count: int) -> None:
    """`count` grants, the grantees taking turns; every fifth one revoked."""
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO grants (id, grantee_id, operations, created_at, revoked_at)"
            " VALUES (%s, %s, ARRAY['Decrypt'], %s, %s)",
            [
                (
                    uuid.uuid4(),
                    grantees[n % len(grantees)],
                    created_at(n),
                    created_at(n) if n % 5 == 0 else None,
                )
                for n in range(count)
            ],
        )


def expected_ids(db: psycopg.Connection[Any], table: str, where: str = "TRUE", *args: Any) -> list[str]:
    query = f"SELECT id FROM {table} WHERE {where} ORDER BY created_at, id"  # noqa: S608 (test constants)
    return [str(row[0]) for row in db.execute(query, args).fetchall()]


def page_through(
    client: TestClient, path: str, key: str, items: str, **params: Any
) -> tuple[list[dict[str, Any]], list[int]]:
    """Every page of a list, following next_cursor: all rows in order, and each page's size."""
    rows: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor: str | None = None
    for _ in range(50):
        query = {**params, **({"cursor": cursor} if cursor is not None else {})}
        response = client.get(path, params=query, headers=bearer(key))
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {items, "next_cursor"}, body.keys()
        rows += body[items]
        sizes.append(len(body[items]))
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, sizes
    raise AssertionError("next_cursor never came back null")


def test_principals_page_through_each_exactly_once_in_order(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    add_principals(db, 250)
    expected = expected_ids(db, "principals")
    assert len(expected) == 253  # with the seed's admin, onboarding and kyc apps

    rows, sizes = page_through(client, "/v1/principals", actors.admin, "principals", limit=100)

    assert [row["id"] for row in rows] == expected
    assert sizes == [100, 100, 53]
    assert rows[99]["created_at"] == rows[100]["created_at"]  # a page ends inside a tie


def test_the_default_page_is_100_and_a_page_ending_the_list_has_no_cursor(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    add_principals(db, 197)  # 200 with the seed's three

    first = client.get("/v1/principals", headers=bearer(actors.admin)).json()
    assert len(first["principals"]) == 100 and first["next_cursor"]
    rows, sizes = page_through(client, "/v1/principals", actors.admin, "principals")
    assert sizes == [100, 100]  # no empty third page
    whole, sizes = page_through(client, "/v1/principals", actors.admin, "principals", limit=200)
    assert sizes == [200]
    assert whole == rows


def test_a_principal_created_between_pages_is_listed_once_at_the_end(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    add_principals(db, 30)
    first = client.get("/v1/principals", params={"limit": 10}, headers=bearer(actors.admin)).json()

    created = create_principal(client, actors.admin, "late-app")
    rest, _ = page_through(
        client, "/v1/principals", actors.admin, "principals", limit=10, cursor=first["next_cursor"]
    )

    ids = [row["id"] for row in first["principals"] + rest]
    assert ids == expected_ids(db, "principals")
    assert ids[-1] == created["id"]
    assert len(set(ids)) == len(ids) == 34


def test_grants_page_through_each_exactly_once_in_order(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    add_grants(db, [actors.onboarding_id, actors.kyc_id], 250)
    expected = expected_ids(db, "grants")
    assert len(expected) == 252  # with the seed's two

    rows, sizes = page_through(client, "/v1/grants", actors.admin, "grants", limit=100)

    assert [row["id"] for row in rows] == expected
    assert sizes == [100, 100, 52]


@pytest.mark.parametrize("active", [None, True, False])
@pytest.mark.parametrize("grantee", [None, "kyc-app", "id"])
def test_grant_filters_hold_on_every_page(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], grantee: str | None, active: bool | None
) -> None:
    add_grants(db, [actors.onboarding_id, actors.kyc_id], 250)
    params: dict[str, Any] = {"limit": 20}
    where, args = ["TRUE"], []
    if grantee is not None:
        params["grantee"] = actors.onboarding_id if grantee == "id" else grantee
        where.append("grantee_id = %s")
        args.append(actors.onboarding_id if grantee == "id" else actors.kyc_id)
    if active is not None:
        params["active"] = str(active).lower()
        where.append("revoked_at IS NULL" if active else "revoked_at IS NOT NULL")
    expected = expected_ids(db, "grants", " AND ".join(where), *args)

    rows, sizes = page_through(client, "/v1/grants", actors.admin, "grants", **params)

    assert [row["id"] for row in rows] == expected
    assert len(sizes) >= 2  # at least two pages, each full but the last
    assert all(size == 20 for size in sizes[:-1]) and 0 < sizes[-1] <= 20
    if active is not None:
        assert {row["active"] for row in rows} == {active}


def cursor_of(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", ["/v1/principals", "/v1/grants"])
def test_a_garbled_cursor_is_422_naming_cursor(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], path: str
) -> None:
    add_principals(db, 5)
    issued = client.get(path, params={"limit": 1}, headers=bearer(actors.admin)).json()["next_cursor"]
    assert issued
    other_list = "/v1/grants" if path == "/v1/principals" else "/v1/principals"
    other = client.get(other_list, params={"limit": 1}, headers=bearer(actors.admin)).json()["next_cursor"]
    row_id = str(uuid.uuid4())
    garbled = [
        "",
        "x",
        "!!!!",
        issued + "x",
        issued[:-3],
        issued[:5] + "." + issued[5:],
        other,  # a cursor of the other list
        cursor_of("p|2020-01-01T00:00:00|" + row_id),  # no offset
        cursor_of("p|yesterday|" + row_id),
        cursor_of("p|2020-01-01T00:00:00+00:00|not-a-uuid"),
        cursor_of("g|2020-01-01T00:00:00+00:00|not-a-uuid"),
        cursor_of("p|2020-01-01T00:00:00+00:00"),
        base64.urlsafe_b64encode(b"\xff\xfe\x00|||").decode().rstrip("="),
        "12345",
    ]
    for cursor in garbled:
        response = client.get(path, params={"cursor": cursor}, headers=bearer(actors.admin))
        assert_error(response, 422, "invalid_input", "cursor")

    too_long = client.get(path, params={"cursor": "A" * 500}, headers=bearer(actors.admin))
    error = assert_error(too_long, 422, "invalid_input")
    assert "cursor" in error["field"]


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten"])
@pytest.mark.parametrize("path", ["/v1/principals", "/v1/grants"])
def test_a_limit_out_of_bounds_is_422(client: TestClient, actors: Actors, path: str, limit: str) -> None:
    error = assert_error(
        client.get(path, params={"limit": limit}, headers=bearer(actors.admin)), 422, "invalid_input"
    )
    assert "limit" in error["field"]


LISTS = ["/v1/principals", "/v1/grants", "/v1/audit/events"]


@pytest.mark.parametrize("path", LISTS)
def test_an_unknown_query_parameter_is_422_naming_it(client: TestClient, actors: Actors, path: str) -> None:
    for params in ({"grante": "kyc-app"}, {"limit": "5", "page": "2"}, {"sort": "name", "offset": "10"}):
        response = client.get(path, params=params, headers=bearer(actors.admin))
        name = next(name for name in params if name != "limit")
        error = assert_error(response, 422, "invalid_input", name)
        assert repr(name) in error["message"]


@pytest.mark.parametrize("path", LISTS)
def test_strangers_and_non_admins_are_refused_before_their_query_is_read(
    client: TestClient, actors: Actors, path: str
) -> None:
    assert_error(client.get(path, params={"grante": "x"}), 401, "unauthenticated")
    assert_error(client.get(path, params={"grante": "x"}, headers=bearer(actors.kyc)), 403, "forbidden")


def test_every_documented_query_parameter_is_accepted(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """The parameters the OpenAPI document lists are the ones the unknown-parameter check knows."""
    add_principals(db, 3)
    admin = bearer(actors.admin)
    cursors = {
        path: client.get(path, params={"limit": 1}, headers=admin).json()["next_cursor"] for path in LISTS
    }
    values = {
        "grantee": "kyc-app",
        "active": "true",
        "limit": "10",
        "principal": "kyc-app",
        "action": "Detokenize",
        "outcome": "allowed",
        "customer_id": "12345",
        "token": "tok_" + "A" * 32,
        "since": "2020-01-01T00:00:00Z",
        "until": "2999-01-01T00:00:00Z",
    }
    document = client.get("/openapi.json").json()
    for path in LISTS:
        declared = {p["name"] for p in document["paths"][path]["get"]["parameters"] if p["in"] == "query"}
        assert {"limit", "cursor"} <= declared
        params = {name: cursors[path] if name == "cursor" else values[name] for name in declared}
        response = client.get(path, params=params, headers=admin)
        assert response.status_code == 200, (path, response.text)
        assert "next_cursor" in response.json()
