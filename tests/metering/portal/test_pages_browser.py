"""The usage pages in Debian's Chromium (headless): the organization page shows exactly the
API's numbers (limits, bars, chart points read from the DOM), renders without console
errors at desktop and phone widths, and a portal token of one organization gets nothing of
another. Screenshots go to build/screenshots/ (and to docs/ with METERING_SCREENSHOT_DOCS=1).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from metering.portal.charts import exact
from tests.conftest import ROOT, Server
from tests.metering.portal.conftest import Browser, History

pytestmark = pytest.mark.services


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def token_for(server: Server, admin: str, history: History, **body: Any) -> str:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        made = await client.post(
            f"/v1/orgs/{history.org}/portal-tokens", headers=bearer(admin), json=body
        )
        assert made.status_code == 201, made.text
        token: str = made.json()["token"]
        return token


def severe_console_entries(browser: Browser) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = browser.driver.get_log("browser")  # type: ignore[attr-defined]
    return [e for e in entries if e.get("level") == "SEVERE"]


def attributes(elements: list[Any], *names: str) -> list[tuple[str, ...]]:
    return [tuple(e.get_attribute(n) for n in names) for e in elements]


async def test_the_org_page_shows_the_apis_numbers(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History, chromium: Browser
) -> None:
    admin = await make_key("admin")
    a = history.org
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(admin)) as api:
        features = {
            f["feature_key"]: f
            for f in (await api.get(f"/v1/orgs/{a}/entitlements")).json()["features"]
        }
        calls = features["max_api_calls_per_month"]
        assert (
            calls["period"] == "cycle" and calls["period_start"] == history.cycle_start.isoformat()
        )
        period = {"from": calls["period_start"], "to": calls["period_end"]}
        day_rows = {}
        for meter in ("api_call", history.sum_meter, history.unique_meter):
            answer = await api.get(
                f"/v1/orgs/{a}/meters/{meter}/usage", params={**period, "group_by": ""}
            )
            day_rows[meter] = [(r["window_start"][:10], r["value"]) for r in answer.json()["rows"]]
        by_model = await api.get(
            f"/v1/orgs/{a}/meters/{history.sum_meter}/usage",
            params={**period, "group_by": "model"},
        )
    token = await token_for(server, admin, history)
    driver: Any = chromium.driver
    driver.set_window_size(1280, 900)
    driver.get(f"{server.url}/orgs/{a}?token={token}")
    assert driver.find_element(By.ID, "timezone").text == "Europe/Berlin"
    assert driver.find_element(By.ID, "period-start").text == history.cycle_start.isoformat()

    # every limit: used and limit as the API has them, the bar as wide as their ratio
    rows = driver.find_elements(By.CSS_SELECTOR, "tr.entitlement")
    shown = {r.get_attribute("data-feature"): r for r in rows}
    limited = {k for k, f in features.items() if "limit" in f}
    assert set(shown) == limited
    for feature, row in shown.items():
        api_feature = features[feature]
        assert row.get_attribute("data-used") == exact(Decimal(str(api_feature["used"])))
        assert row.get_attribute("data-limit") == exact(Decimal(str(api_feature["limit"])))
        if api_feature["limit"] > 0:
            width = row.find_element(By.CSS_SELECTOR, ".meter-bar span").get_attribute("style")
            percent = float(re.search(r"width: ([0-9.]+)%", width).group(1))  # type: ignore[union-attr]
            expected = min(100.0, float(api_feature["used"]) / api_feature["limit"] * 100)
            assert abs(percent - expected) < 0.06, (feature, percent, expected)
    assert shown["max_api_calls_per_month"].get_attribute("data-used") == "850"
    assert shown["max_ai_tokens_per_month"].get_attribute("data-soft") == "true"
    assert "soft" in shown["max_ai_tokens_per_month"].text
    assert "hard" in shown["max_api_calls_per_month"].text

    # each chart: one bar per day the API has a row for, with the API's value
    for meter, expected_rows in day_rows.items():
        chart = driver.find_element(By.CSS_SELECTOR, f'svg.chart[data-meter="{meter}"]')
        bars = attributes(
            chart.find_elements(By.CSS_SELECTOR, "rect.bar"), "data-day", "data-value"
        )
        assert bars == expected_rows, meter
        heights = [
            (Decimal(b.get_attribute("data-value")), float(b.get_attribute("height")))
            for b in chart.find_elements(By.CSS_SELECTOR, "rect.bar")
        ]
        top_value, top_height = max(heights)
        for value, height in heights:  # drawn to one scale
            assert abs(height - float(value / top_value) * top_height) < 0.2
    assert [(d, v) for d, v in day_rows["api_call"]] == [
        (d.isoformat(), exact(q)) for d, q in sorted(history.api_calls_by_day.items())
    ]
    # the running total of a limited meter ends at the limit's `used`, under the limit line
    chart = driver.find_element(By.CSS_SELECTOR, 'svg.chart[data-meter="api_call"]')
    running = [
        Decimal(v)
        for _, v in attributes(
            chart.find_elements(By.CSS_SELECTOR, "circle.running-point"), "data-day", "data-value"
        )
    ]
    totals, so_far = [], Decimal(0)
    for _, value in day_rows["api_call"]:
        so_far += Decimal(value)
        totals.append(so_far)
    assert running == totals and running[-1] == 850
    assert chart.find_element(By.CSS_SELECTOR, "line.limit").get_attribute("data-value") == "1000"

    # the breakdown by dimension: the API's rows by model, summed over the period
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for row in by_model.json()["rows"]:
        sums[row["dimensions"]["model"]] += Decimal(row["value"])
    assert dict(sums) == history.tokens_by_model
    section = driver.find_element(
        By.CSS_SELECTOR, f'section.meter[data-meter="{history.sum_meter}"]'
    )
    breakdown = {
        re.search(r'"model": ?"([^"]+)"', d).group(1): v  # type: ignore[union-attr]
        for d, v in attributes(
            section.find_elements(By.CSS_SELECTOR, "tr.dimension"), "data-dimensions", "data-value"
        )
    }
    assert breakdown == {model: exact(total) for model, total in sums.items()}

    # the crossing of 80% of the api calls, and nothing of the other organization
    crossings = attributes(
        driver.find_elements(By.CSS_SELECTOR, "tr.crossing"), "data-feature", "data-threshold"
    )
    assert ("max_api_calls_per_month", "80") in crossings
    assert "secret-model-of-b" not in driver.page_source
    assert severe_console_entries(chromium) == []
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 6000))
    desktop = chromium.save("org-page-desktop")

    # a phone: nothing wider than the screen (tables scroll inside their box)
    driver.set_window_size(390, 844)
    driver.get(f"{server.url}/orgs/{a}?token={token}")
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    assert (
        driver.find_element(By.CSS_SELECTOR, 'svg.chart[data-meter="api_call"]').size["width"]
        <= 390
    )
    assert severe_console_entries(chromium) == []
    chromium.save("org-page-phone")
    if os.environ.get("METERING_SCREENSHOT_DOCS") == "1":
        shutil.copyfile(desktop, ROOT / "docs" / "org-page.png")


async def test_a_token_reads_only_its_org_and_meters(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History, chromium: Browser, migrated_database: str
) -> None:
    admin = await make_key("admin")
    driver: Any = chromium.driver
    driver.set_window_size(1280, 900)
    token = await token_for(server, admin, history)
    driver.get(f"{server.url}/orgs/{history.other_org}?token={token}")
    assert "another organization" in driver.find_element(By.ID, "message").text
    assert driver.find_elements(By.CSS_SELECTOR, "svg.chart") == []
    assert "secret-model-of-b" not in driver.page_source
    chromium.save("org-page-other-org-refused")
    refused = severe_console_entries(chromium)  # the browser logs the 403 itself, only that
    assert len(refused) == 1 and "403" in refused[0]["message"], refused

    limited = await token_for(server, admin, history, meters=[history.sum_meter])
    driver.get(f"{server.url}/orgs/{history.org}?token={limited}")
    sections = driver.find_elements(By.CSS_SELECTOR, "section.meter")
    assert [s.get_attribute("data-meter") for s in sections] == [history.sum_meter]
    features = [
        r.get_attribute("data-feature")
        for r in driver.find_elements(By.CSS_SELECTOR, "tr.entitlement")
    ]
    assert "max_api_calls_per_month" not in features
    assert history.unique_meter not in driver.page_source
    assert severe_console_entries(chromium) == []

    # an expired token: the page says so (and shows nothing else)
    stale = await token_for(server, admin, history, expires_in=60)
    conn = await asyncpg.connect(migrated_database)
    try:
        await conn.execute(
            "UPDATE portal_tokens SET expires_at = now() - interval '1 second' WHERE prefix = $1",
            stale.split("_")[1],
        )
    finally:
        await conn.close()
    driver.get(f"{server.url}/orgs/{history.org}?token={stale}")
    assert "expired" in driver.find_element(By.ID, "message").text
    assert driver.find_elements(By.CSS_SELECTOR, "tr.entitlement") == []
    driver.get(f"{server.url}/orgs/{history.org}?token=mp_unknown_token")
    assert "unknown" in driver.find_element(By.ID, "message").text


async def test_the_overview_after_signing_in(  # type: ignore[no-untyped-def]
    server: Server, make_key, history: History, chromium: Browser
) -> None:
    """An operator opens `/`, signs in with an admin key in the form, and sees the
    overview; the organizations nearest their limits link to their pages."""
    admin = await make_key("admin")
    # the test database holds other tests' organizations near their limits: this one's own
    # limit of 1 puts it far past them (6,600 of 1)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
        lowered = await api.put(
            f"/v1/orgs/{history.org}/limits/max_ai_tokens_per_month",
            headers=bearer(admin),
            json={"limit": 1, "soft": True},
        )
        assert lowered.status_code == 200, lowered.text
    driver: Any = chromium.driver
    driver.delete_all_cookies()
    driver.set_window_size(1280, 900)
    driver.get(f"{server.url}/")
    severe_console_entries(chromium)  # the 401 of the sign-in page itself
    driver.find_element(By.NAME, "key").send_keys(admin)
    driver.find_element(By.CSS_SELECTOR, "form.signin button").click()
    # the form's post answers 303 to `/`: wait for that page
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "ingestion"))
    assert driver.find_element(By.ID, "dead-letters")
    assert driver.find_element(By.ID, "aggregation")
    assert driver.find_element(By.ID, "webhooks")
    near = driver.find_elements(By.CSS_SELECTOR, f'tr.near-limit[data-org="{history.org}"]')
    assert len(near) == 1
    assert near[0].get_attribute("data-feature") == "max_ai_tokens_per_month"  # 132%
    assert severe_console_entries(chromium) == []
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 4000))
    chromium.save("overview")
    near[0].find_element(By.TAG_NAME, "a").click()  # the cookie opens the org's page too
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "org-id"))
    assert driver.find_element(By.ID, "org-id").text == str(history.org)
    driver.delete_all_cookies()
