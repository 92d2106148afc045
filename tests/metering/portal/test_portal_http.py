"""Portal tokens over real HTTP (contract section 11): who may issue them, what they read,
what refuses them, expiry, meter lists, CORS; and the overview's figures from a real
consumer's Prometheus endpoint."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from metering.config import Settings
from tests.conftest import ConsumerProcess, Server, serving, usage_event_text
from tests.metering.portal.conftest import History

pytestmark = pytest.mark.services


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def issue(
    client: httpx.AsyncClient, key: str, org: uuid.UUID, **body: object
) -> httpx.Response:
    return await client.post(f"/v1/orgs/{org}/portal-tokens", headers=bearer(key), json=body)


async def test_who_issues_and_what_a_token_reads(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History, migrated_database: str
) -> None:
    admin = await make_key("admin")
    reader_a = await make_key("read", org=history.org)
    ingest_a = await make_key("ingest", org=history.org)
    a, b = history.org, history.other_org
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        made = await issue(client, admin, a)
        assert made.status_code == 201, made.text
        issued = made.json()
        assert issued["token"].startswith("mp_") and issued["meters"] is None
        assert issued["page_url"] == f"/orgs/{a}?token={issued['token']}"
        assert (await issue(client, reader_a, a, expires_in=600)).status_code == 201
        assert (await issue(client, reader_a, b)).json()["code"] == "other_organization"
        assert (await issue(client, ingest_a, a)).json()["code"] == "missing_scope"
        too_long = await issue(client, admin, a, expires_in=86401)
        assert too_long.status_code == 422
        assert too_long.json()["errors"][0]["field"] == "body.expires_in"
        unknown = await issue(client, admin, a, meters=["no_such_meter"])
        assert unknown.status_code == 422 and "no_such_meter" in unknown.json()["reason"]
        assert (await issue(client, admin, a, expires_in="3600")).status_code == 422

        token = bearer(issued["token"])
        # reads of its own organization
        mine = await client.get(f"/v1/orgs/{a}/entitlements", headers=token)
        assert mine.status_code == 200
        assert {f["feature_key"] for f in mine.json()["features"]} >= {"max_api_calls_per_month"}
        assert (await client.get(f"/v1/orgs/{a}/usage", headers=token)).status_code == 200
        usage = await client.get(
            f"/v1/orgs/{a}/meters/{history.sum_meter}/usage",
            headers=token,
            params={"group_by": "model", "from": history.cycle_start.isoformat()},
        )
        assert usage.status_code == 200 and usage.json()["rows"]
        crossings = await client.get(f"/v1/orgs/{a}/crossings", headers=token)
        assert crossings.status_code == 200
        assert any(
            c["feature_key"] == "max_api_calls_per_month" and c["threshold_percent"] == 80
            for c in crossings.json()["crossings"]
        )
        check = await client.get(f"/v1/orgs/{a}/features/max_api_calls_per_month", headers=token)
        assert check.status_code == 200 and check.json()["used"] == 850
        # nothing of the other organization
        for path in (
            f"/v1/orgs/{b}/entitlements",
            f"/v1/orgs/{b}/usage",
            f"/v1/orgs/{b}/crossings",
            f"/v1/orgs/{b}/meters/{history.sum_meter}/usage",
            f"/v1/orgs/{b}/features/max_api_calls_per_month",
        ):
            refused = await client.get(path, headers=token)
            assert refused.status_code == 403, path
            assert refused.json()["code"] == "other_organization"
        # and no other route, reads of every org and writes included
        refusals = [
            await client.get("/v1/plans", headers=token),
            await client.get("/v1/webhooks", headers=token),
            await client.get("/v1/audit", headers=token),
            await client.post("/v1/events", headers=token, json=[]),
            await client.put(f"/v1/orgs/{a}/subscription", headers=token, json={"plan": "pro"}),
            await client.put(
                f"/v1/orgs/{a}/limits/max_api_calls_per_month", headers=token, json={"limit": 5}
            ),
            await client.post("/v1/meters", headers=token, json={"key": "x"}),
            await client.post(
                f"/v1/orgs/{a}/events/x/cancel", headers=token, json={"reason": "no"}
            ),
            await issue(client, issued["token"], a),
        ]
        for refused in refusals:
            assert refused.status_code == 403, (refused.request.url, refused.text)
        # the grant is in the audit trail
        audit = await client.get(
            "/v1/audit", headers=bearer(admin), params={"action": "portal_token.created"}
        )
        assert any(
            e["org_id"] == str(a) and e["details"]["prefix"] == issued["token"].split("_")[1]
            for e in audit.json()["entries"]
        )


async def test_a_token_for_some_meters_reads_only_those(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History
) -> None:
    admin = await make_key("admin")
    a = history.org
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        made = await issue(client, admin, a, meters=[history.sum_meter])
        assert made.status_code == 201 and made.json()["meters"] == [history.sum_meter]
        token = bearer(made.json()["token"])
        allowed = await client.get(f"/v1/orgs/{a}/meters/{history.sum_meter}/usage", headers=token)
        assert allowed.status_code == 200
        for meter in (history.unique_meter, "api_call"):
            refused = await client.get(f"/v1/orgs/{a}/meters/{meter}/usage", headers=token)
            assert refused.status_code == 403 and refused.json()["code"] == "meter_not_allowed"
        listed = await client.get("/v1/meters", headers=token)
        assert [m["key"] for m in listed.json()["meters"]] == [history.sum_meter]
        assert (await client.get("/v1/meters/api_call", headers=token)).status_code == 403
        # the limits counted by meters it does not read are not shown either
        features = (await client.get(f"/v1/orgs/{a}/entitlements", headers=token)).json()
        assert "max_api_calls_per_month" not in {f["feature_key"] for f in features["features"]}
        check = await client.get(f"/v1/orgs/{a}/features/max_api_calls_per_month", headers=token)
        assert check.status_code == 403
        assert (await client.get(f"/v1/orgs/{a}/usage", headers=token)).json()["rows"] == []
        assert (await client.get(f"/v1/orgs/{a}/crossings", headers=token)).json()[
            "crossings"
        ] == []


async def test_an_expired_token_is_refused(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History, migrated_database: str
) -> None:
    admin = await make_key("admin")
    a = history.org
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        old = (await issue(client, admin, a)).json()["token"]
        conn = await asyncpg.connect(migrated_database)
        try:
            await conn.execute(
                "UPDATE portal_tokens SET created_at = now() - interval '2 hours', "
                "expires_at = now() - interval '1 second' WHERE prefix = $1",
                old.split("_")[1],
            )
        finally:
            await conn.close()
        refused = await client.get(f"/v1/orgs/{a}/entitlements", headers=bearer(old))
        assert refused.status_code == 401 and refused.json()["code"] == "token_expired"
        page = await client.get(f"/orgs/{a}", params={"token": old})
        assert page.status_code == 401 and "expired" in page.text


async def test_cors_only_for_configured_origins(  # type: ignore[no-untyped-def]
    settings: Settings, tmp_path: Path, make_key, history: History
) -> None:
    admin = await make_key("admin")
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    path = f"/v1/orgs/{history.org}/entitlements"
    with serving(settings, tmp_path / "default.log") as default:
        async with httpx.AsyncClient(base_url=default.url, timeout=10) as client:
            answer = await client.options(
                path, headers={**preflight, "Origin": "https://app.example"}
            )
            assert "access-control-allow-origin" not in answer.headers
    configured = settings.model_copy(update={"portal_origins": "https://app.example"})
    with serving(configured, tmp_path / "cors.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            token = (await issue(client, admin, history.org)).json()["token"]
            ok = await client.options(path, headers={**preflight, "Origin": "https://app.example"})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "https://app.example"
            other = await client.options(
                path, headers={**preflight, "Origin": "https://evil.example"}
            )
            assert other.headers.get("access-control-allow-origin") is None
            read = await client.get(
                path, headers={**bearer(token), "Origin": "https://app.example"}
            )
            assert read.status_code == 200
            assert read.headers["access-control-allow-origin"] == "https://app.example"
            page = await client.get(f"/orgs/{history.org}", params={"token": token})
            assert (
                "frame-ancestors 'self' https://app.example"
                in page.headers["content-security-policy"]
            )


async def test_pages_sign_in_and_refuse(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History
) -> None:
    admin = await make_key("admin")
    reader_b = await make_key("read", org=history.other_org)
    a = history.org
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.get("/")).status_code == 401
        assert 'action="/session"' in (await client.get("/")).text
        # a key never goes in a link
        assert (await client.get(f"/orgs/{a}", params={"token": admin})).status_code == 401
        assert (await client.get(f"/orgs/{a}", headers=bearer(reader_b))).status_code == 403
        assert (await client.get("/orgs/not-a-uuid", headers=bearer(admin))).status_code == 404
        bad = await client.post("/session", content="key=mk_nope_nope&next=/")
        assert bad.status_code == 401
        signed = await client.post(
            "/session",
            content=f"key={admin}&next=//evil.example/",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        # the cookie opens the pages, never the API
        page = await client.get(f"/orgs/{a}")
        assert page.status_code == 200 and str(a) in page.text
        assert (await client.get(f"/v1/orgs/{a}/entitlements")).status_code == 401
        # a reader's cookie does not open the overview
        client.cookies.clear()
        reader = await make_key("read")
        await client.post("/session", content=f"key={reader}&next=/")
        assert (await client.get("/")).status_code == 403


async def test_overview_shows_the_consumers_figures(  # type: ignore[no-untyped-def]
    settings: Settings, tmp_path: Path, make_key, producer, history: History
) -> None:
    """The overview reads a real consumer's Prometheus endpoint: the dead letters by reason
    and the stored rate it shows are the consumer's own; the organizations nearest their
    limits are read with the access checks."""
    consumer = ConsumerProcess(settings, tmp_path / "consumer.log")
    try:
        org = uuid.uuid4()
        for n in range(20):
            await producer.send_and_wait(
                settings.events_topic,
                usage_event_text(org, f"o{n}").encode(),
                key=str(org).encode(),
            )
        await producer.send_and_wait(settings.events_topic, b"{not json", key=str(org).encode())
        targets = f"http://127.0.0.1:{consumer.metrics_port}/metrics,http://127.0.0.1:1/metrics"
        configured = settings.model_copy(update={"overview_metrics_urls": targets})
        admin = await make_key("admin")
        with serving(configured, tmp_path / "serve.log") as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                # other tests' organizations near their limits share the test database:
                # a limit of 1 puts this one far past them (6,600 of 1)
                lowered = await client.put(
                    f"/v1/orgs/{history.org}/limits/max_ai_tokens_per_month",
                    headers=bearer(admin),
                    json={"limit": 1, "soft": True},
                )
                assert lowered.status_code == 200, lowered.text
                text = ""
                for _ in range(60):
                    text = (await client.get("/", headers=bearer(admin))).text
                    if 'data-reason="not_json"' in text:
                        break
                    await asyncio.sleep(1)
                assert 'data-reason="not_json" data-count="1"' in text, text
                await asyncio.sleep(1.2)
                page = await client.get("/", headers=bearer(admin))
                assert page.status_code == 200
                body = page.text
                # a rate over the seconds between two scrapes, and the port nobody serves
                assert re.search(r'id="stored-rate"><b>[0-9.,]+</b>', body), body
                assert "http://127.0.0.1:1/metrics" in body
                near = re.findall(r'data-org="([0-9a-f-]+)" data-feature="([a-z_]+)"', body)
                assert (str(history.org), "max_ai_tokens_per_month") in near
    finally:
        consumer.stop()


async def test_portal_token_command(  # type: ignore[no-untyped-def]
    settings: Settings, server: Server, history: History
) -> None:
    """`metering portal-token ORG --meter K --expires-in 30m` prints a working token and its
    page link; a lifetime past 24 h or an unknown meter is refused with the reason."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "metering", "portal-token", *args],
            check=False,
            env=settings.child_environment(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = run(
        str(history.org), "--meter", history.sum_meter, "--expires-in", "30m", "--url", server.url
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert f"page: {server.url}/orgs/{history.org}?token={token}" in made.stderr
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        listed = await client.get("/v1/meters", headers=bearer(token))
        assert [m["key"] for m in listed.json()["meters"]] == [history.sum_meter]
    too_long = run(str(history.org), "--expires-in", "48h")
    assert too_long.returncode == 2 and "86400" in too_long.stderr
    unknown = run(str(history.org), "--meter", "nope_nope")
    assert unknown.returncode == 2 and "nope_nope" in unknown.stderr
