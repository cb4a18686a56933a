"""The playground page in a real browser (headless Chromium driven by Selenium).

Every test runs against each target of the ``target`` fixture: ``fake`` (the service's own app, ``create_app``,
served by uvicorn with the fake backend of tests/fakes.py: a slow model that wakes from zero, no Ray) and ``live``
(the real graph on Ray Serve with a tiny checkpoint). A feature the live service lacks (``probe_live``) skips the
tests that need it and says which; a missing browser skips, or fails when ``CI=true``.

``PAGE_SCREENSHOTS=DIR`` copies the screenshots the tests take into DIR (the README's come from there);
``PAGE_LIVE_MODEL=PATH`` has the live target serve that checkpoint instead of the tiny random one.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.serve.exceptions import BackPressureError

from serving.api.errors import ApiError, from_exception
from serving.app import create_app
from serving.pool.errors import ModelUnavailableError, UnknownModelError
from serving.pool.progress import PHASES
from settings import Settings, build_settings
from testing.http import serve_asgi
from testing.polling import holds_for, wait_for
from tests.browser import Browser, find_browser, network_events, save_screenshot, start_chromium, stop_chromium
from tests.fakes import WakingBackend
from tests.page_driver import API_KEY, Page, Target, probe_live

WRONG_KEY = "not-the-key"
FAKE_MODEL = "page-model"
# How long the page may take to show what the server already knows (a click's effect, a listing the page
# polls, the pool's view of Serve): seconds when one core is busy with other work. Each wait ends at once
# when its condition shows; none stands for a duration.
SHOWN_S = 30


def fake_settings(auth: bool = True) -> Settings:
    """The fake target's settings: the service's own limits, a quicker heartbeat, and a key unless ``auth`` is off."""
    env = {
        "MODEL_ID": "org/page-model",  # never loaded: the fake backend answers
        "SERVED_MODEL_NAME": FAKE_MODEL,
        "MAX_PROMPT_CHARS": "4000",
        "STREAM_HEARTBEAT_S": "1",
        "RETRY_AFTER_S": "3",
    }
    return build_settings(env | ({"API_KEY": API_KEY} if auth else {}))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def browser() -> Browser:
    found = find_browser()
    if isinstance(found, str):
        reason = f"page tests need a browser: {found}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}. CI must run them: .ci/run installs the browser.", pytrace=False)
        pytest.skip(reason)
    print(f"page tests run in {found.version} ({found.chromium}, driver {found.chromedriver})")
    return found


@pytest.fixture(scope="module", params=["fake", "live"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "fake":
        yield from _fake_target()
    else:
        yield _live_target(request)


def _fake_target() -> Iterator[Target]:
    settings = fake_settings()
    backend = WakingBackend(settings, token_delay_s=0.05, phase_s=0.7)
    with serve_asgi(create_app(backend, settings)) as url:
        yield Target(
            name="fake",
            url=url,
            model=FAKE_MODEL,
            api_key=API_KEY,
            make_cold=backend.scale_to_zero,
            cancelled_streams=lambda: backend.cancelled,
            fake=backend,
        )


def _live_target(request: pytest.FixtureRequest) -> Target:
    from tests.integration.conftest import deploy

    port = request.getfixturevalue("serve_port")
    # PAGE_LIVE_MODEL serves another checkpoint (the embedded model for the README's screenshots, say).
    checkpoint = os.environ.get("PAGE_LIVE_MODEL") or request.getfixturevalue("tiny_chat")
    service = deploy(
        port,
        {
            "MODEL_ID": str(checkpoint),
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "IDLE_TIMEOUT_S": "4",
            "AUTOSCALING_LOOK_BACK_S": "1",
            "METRICS_PUSH_INTERVAL_S": "0.5",
            "REQUEST_TIMEOUT_S": "120",
            "API_KEY": API_KEY,
            # Every wake-up a full cold start: from a warm worker the phases come with the first token,
            # and the tests watch them appear before it.
            "WARM_WORKERS": "0",
            # Each token its own message, as the fake target streams: the tests watch an answer grow step by
            # step, and a small model makes several tokens within the default 50 ms between a stream's messages.
            "STREAM_INTERVAL_S": "0",
        },
    )
    headers = {"Authorization": f"Bearer {API_KEY}"}
    models = service.client.get(f"{service.url}/v1/models", headers=headers, timeout=10)
    page = service.client.get(f"{service.url}/", timeout=10)
    # Both are the Gateway's own routes: an error here (a 404 included) is a regression, never a reason to skip.
    assert page.status_code == 200, f"the live Gateway answered {page.status_code} for the page"
    assert models.status_code == 200, f"the live Gateway answered {models.status_code} for /v1/models: {models.text}"
    model = models.json()["data"][0]["id"]

    def make_cold() -> None:
        def at_zero() -> bool:
            data = service.client.get(f"{service.url}/v1/models", headers=headers, timeout=10).json()["data"]
            return next(m["state"] for m in data if m["id"] == model) == "scaled_to_zero"

        wait_for(at_zero, timeout=90, interval=0.5, what=f"{model} to scale to zero")

    # The model is at zero after the deployment: the probe's request wakes it.
    lacks = probe_live(service.url, model, API_KEY)
    print(f"live service lacks: {lacks or 'nothing'}")
    return Target(
        name="live",
        url=service.url,
        model=model,
        api_key=API_KEY,
        make_cold=make_cold,
        cancelled_streams=None,
        lacks=lacks,
    )


@pytest.fixture(scope="session")
def chromium(browser: Browser) -> Iterator[Any]:
    web = start_chromium(browser)
    try:
        yield web
    finally:
        stop_chromium(web)


@pytest.fixture
def driver(chromium: Any) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage, no network emulation) in the session's browser, at laptop size."""
    previous = chromium.current_window_handle
    chromium.switch_to.new_window("tab")
    fresh = chromium.current_window_handle
    chromium.switch_to.window(previous)
    chromium.close()
    chromium.switch_to.window(fresh)
    chromium.set_window_size(1280, 900)
    network_events(chromium)  # drain what earlier tests left in the log
    chromium.get_log("browser")
    yield chromium
    # An uncaught exception in the page's scripts fails the test that caused it.
    errors = [e["message"] for e in chromium.get_log("browser") if e.get("source") == "javascript"]
    assert not errors, f"the page's scripts failed: {errors}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("screenshots")
    yield directory
    if destination := os.environ.get("PAGE_SCREENSHOTS"):
        Path(destination).mkdir(parents=True, exist_ok=True)
        for png in directory.glob("*.png"):
            shutil.copy(png, Path(destination) / png.name)


@pytest.fixture
def page(driver: Any, target: Target) -> Page:
    return Page(driver, target)


def _warm(target: Target, page: Page) -> None:
    """Make sure the model is up, so that a test about streaming is not a test about waking."""
    if target.state() == "running":
        return
    page.set_number("max-tokens", 2)
    page.send("wake up")
    page.finished(timeout=120)
    page.js("document.getElementById('clear').click()")


# ---------------------------------------------------------------------------------------------- tests


def test_page_loads_and_lists_the_model_with_its_state(page: Page, target: Target) -> None:
    page.open(key=None)
    # Auth is required and no key was given: the key field asks for one, and the picker still lists the
    # models (from /healthz) with their state.
    assert "alert" in page.js("return document.getElementById('key-panel').className")
    assert "needs an API key" in page.by_id("key-message").text
    labels = {"running": "running", "starting": "starting", "scaled_to_zero": "at zero", "evicted": "evicted"}
    # The model's state may change meanwhile (a replica still starting, or going back to zero): the page
    # must show the state the service reports, whichever it is by then.
    page.wait(
        lambda: (
            (label := labels[target.state()])
            and page.model_option() == f"{target.model} ({label})"
            and label in page.by_id("model-state").text
        ),
        10,
        "the model listed, and described, with the state the service reports",
    )
    assert page.js("return document.title") == "LLM playground"
    # The key goes to sessionStorage, never into the address.
    page.set_key(API_KEY)
    assert page.js("return sessionStorage.getItem('playground.apiKey')") == API_KEY
    assert API_KEY not in page.driver.current_url


def test_chat_answer_streams_and_grows(page: Page, target: Target, screenshots: Path) -> None:
    target.requires("chat", "token_streaming")
    page.open(mode="chat")
    _warm(target, page)
    max_tokens = 40 if target.fake else 400
    page.set_number("max-tokens", max_tokens)
    page.set_number("temperature", 0)
    page.record_growth()
    page.send("Tell me about replicas")
    # Read the answer's length from outside too, at every look while it streams.
    seen = []

    def done() -> bool:
        if (a := page.answer()) is not None and a["pending"]:
            seen.append(len(a["text"]))
        return a is not None and not a["pending"]

    wait_for(done, timeout=60, interval=0.05, what="the answer to finish")
    answer = page.finished()
    growth = page.growth()
    lengths = [n for _, n in growth]
    assert answer["text"].strip(), answer
    assert lengths == sorted(lengths), "the answer's text shrank while streaming"
    assert len(set(lengths)) >= 5, f"the answer arrived in fewer than 5 steps: {growth}"
    if target.fake:  # 40 tokens 50 ms apart: slow enough to watch from outside
        assert len({n for n in seen if n > 0}) >= 3, seen
    assert "first token" in answer["stats"] and "tokens/s" in answer["stats"], answer["stats"]
    assert "completion tokens" in answer["stats"], answer["stats"]
    assert "finished" in answer["stats"] or "cut at max tokens" in answer["stats"]
    save_screenshot(page.driver, screenshots, f"streamed-answer-{target.name}")

    # A second turn carries the first one: the conversation is multi-turn.
    page.posts()  # drain the log
    page.set_number("max-tokens", 4)
    page.send("And then?")
    page.finished()
    (body,) = page.sent_bodies(page.posts())
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"], body["messages"]
    assert body["messages"][1]["content"] == answer["text"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stop_ends_the_answer_early_and_cancels_the_request(page: Page, target: Target) -> None:
    target.requires("token_streaming")
    page.open()
    _warm(target, page)
    page.set_number("max-tokens", 1000 if target.fake else 1024)
    # Greedy: a sampled answer of the tiny random model may draw its end of text before Stop is clicked.
    page.set_number("temperature", 0)
    cancelled_before = target.cancelled_streams() if target.cancelled_streams else 0
    page.posts()  # drain the log
    page.send("Write at length")
    page.wait(lambda: len(page.answer()["text"]) > 10, 60, "a few tokens of the answer")
    page.by_id("stop-button").click()
    answer = page.finished(timeout=SHOWN_S)
    assert "stopped" in answer["classes"], answer
    assert answer["stats"].startswith("Stopped"), answer["stats"]
    assert "Stopped" in page.status()
    length = len(answer["text"])
    # An absence: the text must not grow. Watched for a second, every look asserting it.
    holds_for(lambda: len(page.answer()["text"]) == length, seconds=1.0, interval=0.1, what="the answer's length")
    assert page.by_id("send").is_enabled() and not page.by_id("stop-button").is_enabled()
    # The browser cancelled the request...
    posts = page.posts()
    sent = [p["id"] for p in posts if p["event"] == "sent" and p["url"].endswith("completions")]
    assert any(p["event"] == "failed" and p["canceled"] and p["id"] in sent for p in posts), posts
    # ...and the server saw the stream go away.
    if target.cancelled_streams is not None:
        page.wait(lambda: target.cancelled_streams() > cancelled_before, SHOWN_S, "the server to see the cancel")


def test_model_at_zero_says_so_and_keeps_the_wake_up_breakdown(page: Page, target: Target, screenshots: Path) -> None:
    target.make_cold()
    page.open()
    page.wait(lambda: not page.by_id("zero-notice").get_attribute("hidden"), SHOWN_S, "the at-zero notice")
    notice = page.by_id("zero-notice").text
    assert "at zero" in notice and "wakes it" in notice, notice
    assert page.model_option() == f"{target.model} (at zero)"
    page.set_number("max-tokens", 8)
    page.send("Wake up and answer")
    waking = page.wait(lambda: (a := page.answer()) and a["wakeShown"] and a, SHOWN_S, "the wake-up panel")
    assert waking["wakeTitle"].startswith(f"Waking {target.model}"), waking
    # The elapsed time moves while the model wakes.
    later = page.wait(
        lambda: (t := page.answer()["wakeTitle"]) != waking["wakeTitle"] and t, SHOWN_S, "the clock to move"
    )
    assert later.startswith(f"Waking {target.model}") or "woke up" in later, later
    # Afterwards the breakdown stays on the answer.
    answer = page.finished(timeout=120)
    assert answer["text"].strip(), answer
    # The replica's report is complete once its first request has ended: the summary then has every phase.
    summary = page.wait(
        lambda: (a := page.answer())["wakeDone"] and "first_generation" in a["phasesDone"] and a,
        SHOWN_S,
        "the wake-up summary with the first generation",
    )
    assert "woke up" in summary["wakeTitle"], summary
    assert summary["phasesDone"] == ["process_start", "imports", "model_code", "weights", "warmup", "first_generation"]
    # The picker follows: the model is running now, and its last wake-up is listed.
    page.wait(lambda: page.model_option() == f"{target.model} (running)", SHOWN_S, "the picker to say running")
    assert "Last wake-up" in page.by_id("model-state").text
    assert page.by_id("zero-notice").get_attribute("hidden")
    save_screenshot(page.driver, screenshots, f"woke-up-{target.name}")
    # The summary must stay (nothing polls it away): an absence, watched for 2 s, every look asserting it.
    holds_for(lambda: page.answer()["wakeDone"], seconds=2, interval=0.2, what="the wake-up summary")


def test_phases_appear_as_they_complete(page: Page, target: Target, screenshots: Path) -> None:
    target.requires("waking")
    target.make_cold()
    page.open()
    page.set_number("max-tokens", 8)
    page.record_answers()
    page.send("Wake up and answer")
    page.wait(lambda: (a := page.answer()) and a["phasesDone"] and a, 120, "a completed phase")
    save_screenshot(page.driver, screenshots, f"wake-up-{target.name}")
    page.finished(timeout=120)
    # Every state the page showed, in order. Before the first token (a process start and its imports
    # take seconds, several polls of /v1/models) it showed completed phases, in their order, with the
    # one under way marked; how many depends on how fast the wake-up went after the imports.
    shown = page.recorded_answers()
    before = [a for a in itertools.takewhile(lambda a: a["text"] == "", shown) if a["phasesDone"]]
    assert before, f"phases were only shown after the answer: {shown[-1]}"
    assert all(a["pending"] and a["phaseCurrent"] for a in before), before
    done = [tuple(a["phasesDone"]) for a in before]
    assert all(d == PHASES[: len(d)] for d in done), done
    assert done == sorted(done, key=len), f"completed phases went back: {done}"
    assert any(a["text"] for a in shown), shown[-1]


def test_stop_while_the_model_wakes(page: Page, target: Target) -> None:
    target.make_cold()
    page.open()
    page.send("Wake up")
    page.wait(lambda: page.answer()["wakeShown"], SHOWN_S, "the wake-up panel")
    page.by_id("stop-button").click()
    answer = page.finished(timeout=SHOWN_S)
    assert "stopped" in answer["classes"] and answer["text"] == "", answer
    assert answer["stats"].startswith("Stopped · before the first token"), answer["stats"]
    assert answer["wakeTitle"].startswith(f"Stopped waiting for {target.model} after"), answer
    # The text comes back to the box, ready to send again.
    assert page.by_id("prompt").get_attribute("value") == "Wake up"


def test_wrong_api_key_shows_what_to_do(page: Page, target: Target) -> None:
    page.open(key=WRONG_KEY)
    page.send("Hello")
    answer = page.finished(timeout=20)
    assert answer["error"] and "did not accept your API key" in answer["error"], answer
    assert "alert" in page.js("return document.getElementById('key-panel').className")
    assert "did not accept this API key" in page.by_id("key-message").text
    # The message comes back to the box so that fixing the key and pressing Enter sends it again.
    assert page.by_id("prompt").get_attribute("value") == "Hello"
    page.set_key(API_KEY)
    page.set_number("max-tokens", 4)
    page.by_id("prompt").send_keys("\n")
    page.wait(lambda: (a := page.answer())["count"] == 2 and not a["pending"] and a, 120, "the resent answer")
    assert page.answer()["error"] is None


def test_keyboard_enter_sends_and_shift_enter_adds_a_line(page: Page, target: Target) -> None:
    from selenium.webdriver.common.keys import Keys

    page.open()
    page.set_number("max-tokens", 4)
    page.posts()  # drain the log
    box = page.by_id("prompt")
    box.click()
    box.send_keys("first line")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    assert page.answer() is None, "Shift+Enter sent the message"
    box.send_keys(Keys.ENTER)
    answer = page.finished(timeout=120)
    assert answer["text"].strip() and answer["error"] is None, answer
    (body,) = page.sent_bodies(page.posts())
    sent = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    assert sent == "first line\nsecond line"
    assert box.get_attribute("value") == ""
    assert page.js("return document.activeElement.id") == "prompt"


def test_completion_view_streams_a_continuation(page: Page, target: Target) -> None:
    page.open(mode="completion")
    _warm(target, page)
    page.set_number("max-tokens", 6)
    page.set_number("temperature", 0)  # greedy: a sampled six tokens can all be blank, and the check is on text
    page.posts()
    page.send("The socket module")
    answer = page.finished(timeout=60)
    assert answer["text"].strip() and answer["error"] is None, answer
    assert page.js("return document.querySelector('#transcript-completion .echo').textContent") == "The socket module"
    (body,) = page.sent_bodies(page.posts())
    assert body["prompt"] == "The socket module" and "messages" not in body


def test_phone_width(page: Page, target: Target, screenshots: Path) -> None:
    page.driver.set_window_size(390, 844)
    page.open()
    _warm(target, page)
    page.set_number("max-tokens", 12)
    page.js("document.getElementById('sampling').open = false")
    page.send("Hello from a phone")
    page.finished(timeout=60)
    page.wait(lambda: page.model_option() == f"{target.model} (running)", SHOWN_S, "the picker to say running")
    # Nothing is wider than the screen.
    overflow = page.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    for element_id in ("prompt", "send", "stop-button", "model"):
        rect = page.by_id(element_id).rect
        assert rect["x"] >= 0 and rect["x"] + rect["width"] <= 390, (element_id, rect)
    save_screenshot(page.driver, screenshots, f"phone-{target.name}")


# ---------------------------------------------------------------------------------------------- fake only


# Only the fake backend can fail on demand: these tests take the fake target alone.
fake_only = pytest.mark.parametrize("target", ["fake"], indirect=True)


@pytest.fixture
def fake(target: Target) -> WakingBackend:
    assert target.fake is not None
    return target.fake


def _proxy_rate_limit() -> ApiError:
    # The service itself never answers 429 (a full queue is a 503); a proxy in front of it may.
    return ApiError(429, "rate_limited", "Too many requests.", headers={"Retry-After": "2"})


@fake_only
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: UnknownModelError("x", [FAKE_MODEL]), "does not serve this model"),
        (lambda: BackPressureError(num_queued_requests=8, max_queued_requests=8), "at capacity"),
        (lambda: ModelUnavailableError(FAKE_MODEL, waited_s=30.0, retry_after_s=4), "at capacity"),
        (_proxy_rate_limit, "at capacity"),
        (TimeoutError, "time limit"),
        (lambda: RuntimeError("a bug in the model server"), "The service failed (HTTP 500)"),
    ],
    ids=["404-unknown-model", "503-queue-full", "503-no-room", "429-proxy", "504-timeout", "500-internal"],
)
def test_error_statuses_read_as_what_to_do(
    page: Page, fake: WakingBackend, error: Callable[[], BaseException], expected: str
) -> None:
    # What the service answers for this failure, from its own error factory: the page must show its message.
    answered = from_exception(error(), "openai", fake.settings.retry_after_s)
    retry_after = int((answered.headers or {}).get("Retry-After", 0))
    page.open()
    fake.fail_next(error())
    page.send("Hello")
    answer = page.finished(timeout=20)
    assert answer["error"] and expected in answer["error"] and answered.message in answer["error"], answer
    if retry_after:
        assert f"Try again in {retry_after} s" in answer["error"], answer
        assert answer["countdown"] and "send again in" in answer["countdown"], answer
        page.wait(lambda: page.answer()["countdown"] == "You can send again now.", retry_after + 3, "the countdown")
    assert page.by_id("prompt").get_attribute("value") == "Hello"


@fake_only
def test_refusals_from_the_service_name_the_setting(page: Page, fake: WakingBackend) -> None:
    calls = len(fake.calls)
    page.open()
    page.set_number("max-tokens", 5000)
    page.send("Hello")
    answer = page.finished(timeout=20)
    assert "refused the request" in answer["error"] and "max_tokens" in answer["error"], answer
    page.set_number("max-tokens", 4)
    page.js("document.getElementById('prompt').value = 'x'.repeat(5000)")
    page.by_id("send").click()
    answer = page.finished(timeout=20)
    assert "Too large for this service" in answer["error"] and "5000 characters" in answer["error"], answer
    assert len(fake.calls) == calls, "a refused request reached the model"


@fake_only
def test_error_event_mid_stream_keeps_the_partial_answer(page: Page, fake: WakingBackend) -> None:
    page.open()
    fake.break_next(after_tokens=5, error=TimeoutError())
    said = from_exception(TimeoutError(), "openai", fake.settings.retry_after_s).message
    page.set_number("max-tokens", 20)
    page.send("Hello")
    answer = page.finished(timeout=20)
    assert len(answer["text"].split()) == 5, answer
    assert "error" in answer["classes"], answer
    assert f"The answer broke off: {said}" in answer["error"], answer


def test_page_under_a_route_prefix(driver: Any, browser: Browser) -> None:
    from fastapi import FastAPI

    settings = fake_settings(auth=False)
    backend = WakingBackend(settings, token_delay_s=0.01)
    parent = FastAPI()
    parent.mount("/team/llm", create_app(backend, settings))
    with serve_asgi(parent) as url:
        target = Target("prefixed", f"{url}/team/llm", FAKE_MODEL, "", lambda: None, None, backend)
        page = Page(driver, target)
        page.driver.get(f"{url}/team/llm")  # no trailing slash: the page redirects to add it
        page.wait(lambda: page.model_option() is not None, 20, "the model in the picker")
        assert page.driver.current_url == f"{url}/team/llm/"
        assert page.js("return document.getElementById('key-panel').hidden"), "auth is off: no key field"
        page.set_number("max-tokens", 4)
        page.send("Hello")
        answer = page.finished(timeout=20)
        assert answer["text"].strip() and answer["error"] is None, answer


@fake_only
def test_network_error_says_the_service_is_unreachable(page: Page) -> None:
    page.open()
    page.driver.execute_cdp_cmd("Network.enable", {})
    page.driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    page.send("Hello")
    answer = page.finished(timeout=20)
    assert "Could not reach the service" in answer["error"], answer


@fake_only
def test_sse_parser_reassembles_events_split_anywhere(page: Page) -> None:
    page.open()
    result = page.driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        import('./static/sse.js').then(({SSEParser}) => {
          const stream = ': waking m: imports (2.0 s)\\r\\n\\r\\n' +
            'data: {"a": "café → 🙂"}\\n\\n' +
            'data: line one\\ndata: line two\\r\\n\\r\\n' +
            'event: ignored\\ndata: [DONE]\\n\\n' +
            'data: no blank line at the end';
          const bytes = new TextEncoder().encode(stream);
          const runs = [];
          // Every cut point, and byte by byte: the events must come out the same.
          for (const size of [1, 2, 3, 5, 7, bytes.length]) {
            const got = [];
            const p = new SSEParser({onData: d => got.push(['data', d]), onComment: c => got.push(['comment', c])});
            for (let i = 0; i < bytes.length; i += size) p.push(bytes.slice(i, i + size));
            p.end();
            runs.push(got);
          }
          done(runs);
        }).catch(e => done(String(e)));
        """
    )
    expected = [
        ["comment", "waking m: imports (2.0 s)"],
        ["data", '{"a": "café → 🙂"}'],
        ["data", "line one\nline two"],
        ["data", "[DONE]"],
        ["data", "no blank line at the end"],
    ]
    assert isinstance(result, list), result
    for run in result:
        assert run == expected
