"""Per-call webhook URLs are server-side requests: nothing non-public unless allowed, checked
when the call is made and again at every connection."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from voxphone.clock import FakeClock, SystemClock
from voxphone.events.delivery import Gone, Retry, Sent
from voxphone.events.model import EventSequencer
from voxphone.events.outbox import Stored
from voxphone.events.ssrf import HostPolicy, RefusedUrl
from voxphone.events.webhook import HttpTransport


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9000/hooks", "loopback"),
        ("http://localhost/hooks", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.1.2.3/x", "private"),
        ("https://192.168.0.10/x", "private"),
        ("http://0.0.0.0/", "unspecified"),
        ("ftp://example.com/x", "only http:// and https://"),
        ("file:///etc/passwd", "only http:// and https://"),
    ],
)
async def test_non_public_addresses_and_other_schemes_are_refused(url: str, why: str) -> None:
    with pytest.raises(RefusedUrl, match=why) as exc:
        await HostPolicy().check_url(url)
    assert "\n" not in str(exc.value)


async def test_public_addresses_and_allowed_hosts_pass() -> None:
    await HostPolicy().check_url("https://93.184.216.34/hooks")  # literal: no DNS needed
    allowed = HostPolicy(["127.0.0.1", "10.0.0.0/8", "localhost"])
    for url in ("http://127.0.0.1:9000/", "http://10.9.8.7/", "http://localhost:1/"):
        await allowed.check_url(url)
    with pytest.raises(RefusedUrl, match="webhook.allowed_hosts"):
        await allowed.check_url("http://192.168.1.1/")


def _stored() -> Stored:
    event = EventSequencer("c", FakeClock()).next("call.started", {})
    return Stored(1, event, event.to_json(), 0.0)


async def test_the_connection_is_checked_again_whatever_the_name_resolves_to() -> None:
    """A name that resolves to loopback at delivery time (DNS rebinding) fails to connect; a
    literal address is given up on; allowed, the same receiver gets the event."""
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    port = server.port
    urls = {"name": f"http://localhost:{port}/hooks", "ip": f"http://127.0.0.1:{port}/hooks"}
    guarded = {k: HttpTransport(lambda _, u=u: u, [], SystemClock(), 5, guard=HostPolicy())
               for k, u in urls.items()}  # fmt: skip
    trusted = HttpTransport(lambda _: urls["name"], [], SystemClock(), 5, guard=HostPolicy(["127.0.0.0/8"]))  # fmt: skip
    try:
        by_name = await guarded["name"].send(_stored())
        by_ip = await guarded["ip"].send(_stored())
        allowed = await trusted.send(_stored())
    finally:
        for t in (*guarded.values(), trusted):
            await t.close()
        await server.close()
    assert isinstance(by_name, Retry) and "loopback" in by_name.error, by_name
    assert isinstance(by_ip, Gone) and "loopback" in by_ip.error, by_ip
    assert allowed == Sent() and len(got) == 1
