"""The console in a real Chromium (Debian's, driven by Playwright): an admin's day, start to end.

Skipped, with the reason shown, where Chromium or Playwright is missing (.ci/run installs both).
Screenshots go to a temporary folder; `make screenshots` sets VAULT_CONSOLE_SCREENSHOTS to
docs/console to refresh the committed ones.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.main import create_app
from tests.conftest import ClientFactory, bearer, create_admin, create_principal
from tests.processes import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The machine's network is closed: without these, Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
try:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, ViewportSize, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]

WIDE: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(
        sync_playwright is None, reason="Playwright is not installed (pip install playwright)"
    ),
]


class ThreadServer:
    """The app on a real port, in this process (so it shares the test's in-process KMS mock)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the console server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Served:
    url: str
    admin: str
    second_admin: str


@pytest.fixture
def served(make_client: ClientFactory, kms_key_id: str) -> Iterator[Served]:
    """The vault, its first admin and a server, made before the browser starts (Playwright's sync
    API runs an event loop in the test's thread, where the vault's blocking calls cannot)."""
    vault, client = make_client(kms_key_id, dual_control=True)
    admin = create_admin(vault, "admin-a")
    second_admin = create_admin(vault, "admin-b")
    create_principal(client, admin, "target-app")
    with ThreadServer(create_app(vault)) as server:
        yield Served(server.url, admin, second_admin)


@pytest.fixture
def browser(served: Served) -> Iterator[Browser]:
    assert sync_playwright is not None and CHROMIUM is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    chosen = os.environ.get("VAULT_CONSOLE_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def watch(page: Page) -> list[str]:
    """Every script dialog (an XSS that ran) and CSP violation the page reports."""
    problems: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(message.text)

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    return problems


def fits(page: Page) -> bool:
    """No horizontal scrolling of the page itself (wide tables scroll inside their own box)."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def sign_in(page: Page, api_key: str) -> None:
    page.goto("/console/sign-in")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()


def test_two_admins_hand_a_service_its_key_and_grant_it_decrypt_in_chromium(
    served: Served, browser: Browser, shots: Path
) -> None:
    admin, server = served.admin, served
    with httpx.Client(base_url=server.url) as api:
        context = browser.new_context(viewport=WIDE, base_url=server.url)
        page = context.new_page()
        problems = watch(page)

        # Sign in: the key goes in once; what the browser keeps is a session cookie.
        page.goto("/console")
        assert page.url.endswith("/console/sign-in")
        page.screenshot(path=str(shots / "sign-in.png"), full_page=True)
        page.get_by_label("API key").fill(admin)
        page.get_by_role("button", name="Sign in").click()
        assert page.url.endswith("/console/approvals")
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["piivault_console"]["httpOnly"] and cookies["piivault_console"]["sameSite"] == "Strict"
        assert admin not in str(context.cookies())

        # A service, whose first key is shown once; it mints its own and revokes the first.
        page.goto("/console/callers")
        page.get_by_label("Name").fill("kyc-web")
        page.get_by_role("button", name="Create").click()
        first_key = page.locator("#new-api-key").input_value()
        assert page.get_by_text("Shown only this once").is_visible()
        # The picture must not carry a working key: only its public prefix is left in it.
        page.locator("#new-api-key").evaluate("field => { field.value = field.value.slice(0, 12) + '…'; }")
        page.screenshot(path=str(shots / "callers-new-key.png"), full_page=True)
        me = api.get("/v1/principals/me", headers=bearer(first_key)).json()
        own = api.post(f"/v1/principals/{me['id']}/keys", headers=bearer(first_key))
        assert own.status_code == 201
        revoked = api.delete(
            f"/v1/principals/{me['id']}/keys/{me['keys'][0]['key_id']}", headers=bearer(own.json()["api_key"])
        )
        assert revoked.status_code == 200
        page.goto("/console/callers")
        assert page.get_by_text("revoked").count() >= 1

        # Admin A requests a Decrypt grant: pending, and A cannot approve it.
        page.goto("/console/grants")
        page.get_by_label("Grantee (name or id)").fill("kyc-web")
        page.get_by_label("Decrypt", exact=True).check()
        page.get_by_label("Data type (empty: any)").fill("DriverLicense")
        page.get_by_label("Name (optional)").fill("<img src=x onerror=alert(1)>")
        page.get_by_role("button", name="Create grant").click()
        row = page.locator("tr", has_text="Decrypt DriverLicense of any customer, with no expiry")
        assert row.count() == 1 and row.get_by_text("pending").is_visible()
        assert row.get_by_text("<img src=x onerror=alert(1)>").is_visible()  # shown as text
        page.goto("/console/approvals")
        request_row = page.locator("tr", has_text="kyc-web: Decrypt DriverLicense")
        assert request_row.get_by_text("your request: another admin decides").is_visible()
        assert request_row.get_by_role("button", name=re.compile("^Approve")).count() == 0
        # Not even by posting the form by hand, with a valid CSRF token.
        approval_id = request_row.locator("code").first.inner_text()
        token = page.locator("input[name=csrf_token]").first.input_value()
        refused = page.evaluate(
            """async ([url, token]) => {
                const body = new URLSearchParams({csrf_token: token});
                const answer = await fetch(url, {method: "POST", body});
                return [answer.status, await answer.text()];
            }""",
            [f"{server.url}/console/approvals/{approval_id}/approve", token],
        )
        assert refused[0] == 403 and "second_admin_required" in refused[1]
        page.screenshot(path=str(shots / "approvals-pending.png"), full_page=True)

        # Admin B approves it: active.
        second = browser.new_context(viewport=WIDE, base_url=server.url)
        b_page = second.new_page()
        problems += watch(b_page)
        sign_in(b_page, served.second_admin)
        assert b_page.url.endswith("/console/approvals")
        b_row = b_page.locator("tr", has_text="kyc-web: Decrypt DriverLicense")
        b_row.get_by_role("button", name=re.compile("^Approve")).click()
        assert b_page.get_by_text("Nothing here.").is_visible()
        second.close()
        page.goto("/console/grants")
        row = page.locator("tr", has_text="Decrypt DriverLicense of any customer, with no expiry")
        assert row.get_by_text("active").is_visible()
        page.screenshot(path=str(shots / "grants.png"), full_page=True)
        row.get_by_role("button", name=re.compile("Revoke grant")).click()
        assert page.locator("tr", has_text="Decrypt DriverLicense").get_by_text("revoked").is_visible()

        # The audit trail holds all of it, and the chain verifies.
        page.goto("/console/audit")
        actions = (
            "ConsoleSignIn",
            "CreatePrincipal",
            "CreateGrant",
            "ApproveRequest",
            "RevokeGrant",
            "RevokeApiKey",
        )
        for action in actions:
            assert page.locator("td", has_text=re.compile(f"^{action}$")).count() >= 1, action
        page.screenshot(path=str(shots / "audit.png"), full_page=True)
        page.get_by_label("Action").fill("ApproveRequest")
        page.get_by_role("button", name="Filter").click()
        page.get_by_role("link", name="Detail").first.click()
        assert page.get_by_text("ApproveRequest").first.is_visible()
        page.screenshot(path=str(shots / "audit-event.png"), full_page=True)
        page.goto("/console/audit")
        page.get_by_role("button", name="Verify the chain").click()
        assert page.get_by_text(re.compile(r"Intact: \d+ events checked")).is_visible()
        page.screenshot(path=str(shots / "audit-verify.png"), full_page=True)
        page.goto("/console/keys")
        page.screenshot(path=str(shots / "keys.png"), full_page=True)
        page.goto("/console/data-types")
        assert page.locator("td", has_text=re.compile("^DriverLicense$")).count() == 1
        page.screenshot(path=str(shots / "data-types.png"), full_page=True)

        # Phone-sized: every page fits the screen's width.
        phone = context.new_page()
        phone.set_viewport_size(PHONE)
        for path in (
            "/console/approvals",
            "/console/callers",
            "/console/grants",
            "/console/audit",
            "/console/keys",
            "/console/data-types",
        ):
            phone.goto(path)
            assert fits(phone), path
        phone.goto("/console/grants")
        phone.screenshot(path=str(shots / "grants-phone.png"), full_page=True)
        phone.close()

        # Sign out: the session is over, in this browser and for anyone holding its cookie.
        session_cookie = next(c for c in context.cookies() if c["name"] == "piivault_console")
        page.get_by_role("button", name="Sign out").click()
        assert page.url.endswith("/console/sign-in")
        page.goto("/console/callers")
        assert page.url.endswith("/console/sign-in")
        replay = api.get(
            "/console/callers",
            headers={"Cookie": f"piivault_console={session_cookie['value']}"},
            follow_redirects=False,
        )
        assert replay.status_code == 303
        assert problems == []
        context.close()


def test_a_form_posted_without_its_csrf_token_is_refused_in_chromium(
    served: Served, browser: Browser
) -> None:
    admin, server = served.admin, served
    context = browser.new_context(viewport=WIDE, base_url=server.url)
    page = context.new_page()
    page.goto("/console/sign-in")
    page.get_by_label("API key").fill(admin)
    page.get_by_role("button", name="Sign in").click()
    # A form post without the token, from the vault's own origin (so SameSite does not stop
    # the cookie): the CSRF check alone must refuse it.
    page.goto("/console/callers")
    response = page.evaluate(
        """async (url) => {
            const body = new URLSearchParams({name: "planted-app", role: "admin"});
            const answer = await fetch(url, {method: "POST", body, credentials: "include"});
            return answer.status;
        }""",
        f"{server.url}/console/callers",
    )
    assert response == 422
    assert "planted-app" not in page.content()
    page.goto("/console/callers")
    assert page.get_by_text("planted-app").count() == 0
    context.close()
