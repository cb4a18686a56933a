"""Drive the playground page in a browser: the services it is tested against, and what a person does on it.

``Target`` is a service the page can be tested against (the service's app with a fake backend, or the real graph);
``probe_live`` finds which parts of the API contract a live service has, so that a test needing one it lacks
skips and says which. ``Page`` clicks, types and reads the page the way a person does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from testing.polling import wait_for
from tests.browser import network_events

API_KEY = "page-test-key"

# The last answer on the page as a dict (``Page.answer``), as a JS function ``lastAnswer()``.
ANSWER_JS = """
function lastAnswer() {
  const all = document.querySelectorAll('.transcript:not([hidden]) .bubble.assistant');
  const a = all[all.length - 1];
  if (!a) return null;
  const body = a.querySelector('.answer');
  const echo = body.querySelector('.echo');
  const wake = a.querySelector('.wake');
  return {
    count: all.length,
    text: body.textContent.slice(echo ? echo.textContent.length : 0),
    pending: a.classList.contains('pending'),
    classes: a.className,
    stats: a.querySelector('.stats').textContent,
    error: (a.querySelector('.error') || {}).textContent || null,
    countdown: (a.querySelector('.countdown') || {}).textContent || null,
    wakeShown: !wake.hidden,
    wakeTitle: (wake.querySelector('h4') || {}).textContent || null,
    wakeDone: wake.classList.contains('done'),
    phasesDone: [...wake.querySelectorAll('li.done')].map(li => li.dataset.phase),
    phaseCurrent: (wake.querySelector('li.current') || {dataset: {}}).dataset.phase || null,
  };
}
"""


@dataclass
class Target:
    """A service the page can be tested against."""

    name: str
    url: str
    model: str
    api_key: str
    make_cold: Callable[[], None]  # returns once /v1/models says the model is at zero
    cancelled_streams: Callable[[], int] | None  # what the server saw; None where it cannot tell
    fake: Any = None  # the fake backend (tests.fakes.WakingBackend) when the target is the app without Ray
    lacks: dict[str, str] = field(default_factory=dict)  # feature -> what the probe saw

    @property
    def mode(self) -> str:
        """The page's view that tests use when either would do: chat, unless the service cannot chat."""
        return "completion" if "chat" in self.lacks else "chat"

    def requires(self, *features: str) -> None:
        for feature in features:
            if feature in self.lacks:
                pytest.skip(f"the {self.name} service lacks {feature}: {self.lacks[feature]}")

    def models(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def state(self) -> str:
        return next(m["state"] for m in self.models() if m["id"] == self.model)


def probe_live(url: str, model: str, api_key: str) -> dict[str, str]:
    """Which features of the API contract the service lacks, from one streamed completion of a model at zero.

    Features: ``waking`` (progress in /v1/models while a model starts), ``token_streaming`` (an answer in
    several pieces), ``chat`` (chat completions from this model).
    """
    headers = {"Authorization": f"Bearer {api_key}"}
    waking: list[dict[str, Any]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            data = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"]
            waking.extend(m["waking"] for m in data if m["id"] == model and m.get("waking"))
            done.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    pieces = 0
    body = {"model": model, "prompt": "The socket module", "max_tokens": 32, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=180) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[len("data: ") :]).get("choices") or []
                    pieces += sum(1 for c in choices if c.get("text"))
    finally:
        done.set()
        poller.join(timeout=15)
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=headers,
        timeout=60,
    )
    lacks = {}
    if not waking:
        lacks["waking"] = "/v1/models showed no `waking` progress while the model started"
    if pieces < 2:
        lacks["token_streaming"] = f"a streamed 32-token completion arrived in {pieces} piece(s)"
    if chat.status_code != 200:
        lacks["chat"] = f"/v1/chat/completions answered {chat.status_code}: {chat.text[:200]}"
    return lacks


class Page:
    """What a person does on the page, and what they read there."""

    def __init__(self, driver: Any, target: Target) -> None:
        self.driver = driver
        self.target = target

    def open(self, key: str | None = API_KEY, mode: str | None = None) -> None:
        self.driver.get(f"{self.target.url}/")
        if key is not None:
            self.set_key(key)
        self.wait(lambda: self.model_option() is not None, 20, f"{self.target.model} in the model picker")
        self.use_mode(mode or self.target.mode)

    def use_mode(self, mode: str) -> None:
        self.js("document.querySelector(`input[name=mode][value=${arguments[0]}]`).click()", mode)

    def set_key(self, key: str) -> None:
        self.wait(lambda: self.js("return !document.getElementById('key-panel').hidden"), 20, "the API key field")
        field = self.by_id("api-key")
        field.clear()
        field.send_keys(key)

    def by_id(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_for(condition, timeout=timeout, interval=0.05, what=what)

    def model_option(self) -> str | None:
        return self.js(
            "const o = [...document.getElementById('model').options].find(o => o.value === arguments[0]);"
            "return o ? o.textContent : null;",
            self.target.model,
        )

    def set_number(self, element_id: str, value: int | str) -> None:
        self.js("document.getElementById('sampling').open = true")
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(str(value))

    def send(self, text: str) -> None:
        box = self.by_id("prompt")
        box.send_keys(text)
        self.by_id("send").click()

    def answer(self) -> dict[str, Any]:
        """The last answer: its text, classes, stats line, error and wake-up panel."""
        return self.js(f"{ANSWER_JS}; return lastAnswer();")

    def record_answers(self) -> None:
        """Record, inside the page, the last answer as it is after every change to the transcript.

        A state the page shows for less than a look from here takes (a poll of the page every 50 ms
        through the driver) is kept all the same: a test reads the whole sequence afterwards.
        """
        self.js(
            f"""
            {ANSWER_JS};
            window.__answers = [];
            const log = document.querySelector('.transcript:not([hidden])');
            new MutationObserver(() => {{
              const a = lastAnswer();
              if (a) window.__answers.push(a);
            }}).observe(log, {{subtree: true, childList: true, characterData: true, attributes: true}});
            """
        )

    def recorded_answers(self) -> list[dict[str, Any]]:
        return self.js("return window.__answers")

    def finished(self, timeout: float = 60) -> dict[str, Any]:
        return self.wait(lambda: (a := self.answer()) and not a["pending"] and a, timeout, "the answer to finish")

    def record_growth(self) -> None:
        """Record (time, length) of the streaming answer each time its text changes, inside the page."""
        self.js(
            """
            window.__growth = [];
            const log = document.querySelector('.transcript:not([hidden])');
            new MutationObserver(() => {
              const all = log.querySelectorAll('.bubble.assistant .answer');
              const last = all[all.length - 1];
              if (last) window.__growth.push([performance.now(), last.textContent.length]);
            }).observe(log, {subtree: true, childList: true, characterData: true});
            """
        )

    def growth(self) -> list[tuple[float, int]]:
        return [tuple(x) for x in self.js("return window.__growth")]

    def status(self) -> str:
        return self.by_id("status").text

    def posts(self) -> list[dict[str, Any]]:
        """The page's POSTs and how each ended, from the browser's network log (drained by reading it)."""
        posts = []
        for event in network_events(self.driver):
            params = event["params"]
            if event["method"] == "Network.requestWillBeSent" and params["request"]["method"] == "POST":
                posts.append(
                    {
                        "id": params["requestId"],
                        "url": params["request"]["url"],
                        "event": "sent",
                        "body": params["request"].get("postData"),
                    }
                )
            elif event["method"] == "Network.loadingFailed":
                posts.append({"id": params["requestId"], "event": "failed", "canceled": params.get("canceled")})
            elif event["method"] == "Network.loadingFinished":
                posts.append({"id": params["requestId"], "event": "finished"})
        return posts

    def sent_bodies(self, posts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The JSON bodies of the generation requests among ``posts``."""
        return [
            json.loads(p["body"])
            for p in posts
            if p["event"] == "sent" and p["url"].endswith(("/v1/chat/completions", "/v1/completions"))
        ]
