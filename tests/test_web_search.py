"""web_search: the HTTP provider against a local server, BM25 over a folder, the formatter, the classifier."""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import web_search
from nanochat.web_search import (DEMO_DOCS_DIR, HTTPSearchProvider, LocalSearchProvider, SearchError,
                                 approx_token_count, format_results, needs_web_search, needs_web_search_contextual,
                                 provider_from_env, run_web_search, trim_to_token_budget, truncate_to_tokens)

# -----------------------------------------------------------------------------
# A Tavily-like server: answers each POST with the next scripted (status, body, delay)


class ScriptedSearchServer:
    def __init__(self, script):
        self.script = list(script)
        self.requests = []  # (headers, parsed JSON body) of every request received
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((dict(self.headers), json.loads(body)))
                status, payload, delay = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if delay:  # not time.sleep: tests replace that to record the client's backoff
                    threading.Event().wait(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/search"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tavily_answer(n, content="Sunny and 27 degrees."):
    return {"query": "q", "answer": None, "response_time": 0.1,
            "results": [{"title": f"Result {i}", "url": f"https://example.com/{i}", "content": f"{content} ({i})",
                         "score": 1.0 - i / 10, "raw_content": None} for i in range(n)]}


@pytest.fixture
def sleeps(monkeypatch):
    """Record the backoff waits instead of sleeping them."""
    waited = []
    monkeypatch.setattr(web_search.time, "sleep", waited.append)
    return waited


def test_http_success_sends_tavily_request_and_normalizes_results(sleeps):
    with ScriptedSearchServer([(200, _tavily_answer(4), 0)]) as server:
        provider = HTTPSearchProvider(url=server.url, api_key="tvly-secret")
        results = provider.search("weather in Seoul", k=2)
    assert results == [{"title": "Result 0", "url": "https://example.com/0", "content": "Sunny and 27 degrees. (0)"},
                       {"title": "Result 1", "url": "https://example.com/1", "content": "Sunny and 27 degrees. (1)"}]
    headers, body = server.requests[0]
    assert body == {"query": "weather in Seoul", "max_results": 2, "api_key": "tvly-secret"}
    assert headers["Authorization"] == "Bearer tvly-secret"
    assert len(server.requests) == 1 and sleeps == []


def test_http_url_and_key_from_environment(monkeypatch):
    with ScriptedSearchServer([(200, _tavily_answer(1), 0)]) as server:
        monkeypatch.setenv("NANOCHAT_SEARCH_URL", server.url)
        monkeypatch.setenv("NANOCHAT_SEARCH_API_KEY", "from-env")
        provider = provider_from_env()
        assert isinstance(provider, HTTPSearchProvider)
        assert provider.search("gold price", 1)[0]["title"] == "Result 0"
    assert server.requests[0][1]["api_key"] == "from-env"


def test_http_without_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NANOCHAT_SEARCH_URL", raising=False)
    with pytest.raises(SearchError, match="NANOCHAT_SEARCH_URL"):
        HTTPSearchProvider()


def test_http_without_key_sends_none(sleeps):
    with ScriptedSearchServer([(200, _tavily_answer(1), 0)]) as server:
        HTTPSearchProvider(url=server.url, api_key="").search("q", 1)
    headers, body = server.requests[0]
    assert "api_key" not in body and "Authorization" not in headers


def test_http_timeout_is_retried_then_reported():
    with ScriptedSearchServer([(200, _tavily_answer(1), 0.6)]) as server:
        provider = HTTPSearchProvider(url=server.url, timeout=0.15, max_retries=1, backoff_seconds=0.01)
        with pytest.raises(SearchError, match=r"timed out after 0.15s on all 2 attempts"):
            provider.search("q", 1)
        assert len(server.requests) == 2


def test_http_500_then_success_is_retried(sleeps):
    script = [(500, {"error": "boom"}, 0), (503, b"busy", 0), (200, _tavily_answer(1), 0)]
    with ScriptedSearchServer(script) as server:
        results = HTTPSearchProvider(url=server.url, max_retries=2, backoff_seconds=0.25).search("q", 1)
    assert [r["title"] for r in results] == ["Result 0"]
    assert len(server.requests) == 3
    assert sleeps == [0.25, 0.5]  # exponential backoff


def test_http_persistent_500_gives_up_after_max_retries(sleeps):
    with ScriptedSearchServer([(502, b"bad gateway", 0)]) as server:
        with pytest.raises(SearchError, match="HTTP 502 on all 4 attempts"):
            HTTPSearchProvider(url=server.url, max_retries=3, backoff_seconds=1).search("q", 1)
    assert len(server.requests) == 4 and sleeps == [1, 2, 4]


@pytest.mark.parametrize("status, hint", [(401, "NANOCHAT_SEARCH_API_KEY"), (400, "Tavily-compatible"),
                                          (429, "rate-limited"), (404, "NANOCHAT_SEARCH_URL")])
def test_http_4xx_is_not_retried(sleeps, status, hint):
    with ScriptedSearchServer([(status, {"detail": "no"}, 0), (200, _tavily_answer(1), 0)]) as server:
        with pytest.raises(SearchError, match=f"HTTP {status}.*{hint}"):
            HTTPSearchProvider(url=server.url, api_key="tvly-secret", max_retries=3).search("q", 1)
    assert len(server.requests) == 1 and sleeps == []


@pytest.mark.parametrize("payload, message", [(b"<html>oops</html>", "malformed JSON"),
                                              ({"answer": "x"}, "without a 'results' list"),
                                              ([1, 2], "without a 'results' list"),
                                              ({"results": ["just a string"]}, "not an object")])
def test_http_malformed_answers_are_clear_errors_and_not_retried(sleeps, payload, message):
    with ScriptedSearchServer([(200, payload, 0)]) as server:
        with pytest.raises(SearchError, match=message):
            HTTPSearchProvider(url=server.url, max_retries=2).search("q", 1)
    assert len(server.requests) == 1


def test_http_connection_refused_is_retried_then_reported(sleeps):
    with ScriptedSearchServer([(200, _tavily_answer(1), 0)]) as server:
        url = server.url
    with pytest.raises(SearchError, match="could not connect.*on all 3 attempts"):
        HTTPSearchProvider(url=url, max_retries=2, backoff_seconds=0.5).search("q", 1)
    assert sleeps == [0.5, 1.0]


def test_http_results_trimmed_to_token_budget(sleeps):
    long_text = "word " * 2000
    with ScriptedSearchServer([(200, _tavily_answer(3, content=long_text), 0)]) as server:
        results = HTTPSearchProvider(url=server.url, max_tokens=300).search("q", 3)
    assert len(results) == 3
    for r in results:
        assert r["content"].endswith("...") and r["content"].startswith("word word")
        tokens = sum(approx_token_count(r[f]) for f in ("title", "url", "content"))
        assert 60 < tokens <= 300 // 3  # its share, and most of it used


# -----------------------------------------------------------------------------
# Token budget and formatting

@pytest.mark.parametrize("count_tokens", [approx_token_count, lambda s: len(s.split())], ids=["approx", "words"])
def test_truncate_to_tokens_fits_and_keeps_a_prefix(count_tokens):
    text = " ".join(f"w{i}" * (1 + i % 5) for i in range(300))
    for budget in (0, 1, 5, 17, 100, 10_000):
        cut = truncate_to_tokens(text, budget, count_tokens)
        assert count_tokens(cut) <= budget
        assert text.startswith(cut.removesuffix("..."))
        if count_tokens(text) <= budget:
            assert cut == text
        elif budget >= 17:
            assert count_tokens(cut) >= budget // 2  # not cut far more than needed


def test_trim_to_token_budget_uses_the_given_counter():
    results = [{"title": "t", "url": "u", "content": "a b c d e f g h i j"} for _ in range(2)]
    trimmed = trim_to_token_budget(results, max_tokens=12, count_tokens=lambda s: len(s.split()))
    assert [r["content"] for r in trimmed] == ["a b c d...", "a b c d..."]  # 6 each: title 1 + url 1 + 4


def test_format_results_is_bounded_and_ordered():
    results = [{"title": f"Title {i}", "url": f"file:///docs/{i}.md", "content": "lots of text\n\n" * 500}
               for i in range(5)]
    text = format_results(results, max_chars=800)
    assert len(text) <= 800
    positions = [text.index(f"[{i + 1}] Title {i}\nfile:///docs/{i}.md\nlots of text") for i in range(5)]
    assert positions == sorted(positions)
    assert format_results([]) == "No results found."
    short = [{"title": "Seoul", "url": "file:///s.md", "content": "Sunny,\n 27 C."}]
    assert format_results(short) == "[1] Seoul\nfile:///s.md\nSunny, 27 C."


def test_run_web_search_turns_errors_into_text():
    class Failing:
        def search(self, query, k):
            raise SearchError("search API http://x answered HTTP 401")
    assert run_web_search(Failing(), "q") == "web_search error: search API http://x answered HTTP 401"
    assert run_web_search(None, "q").startswith("web_search error: no search provider configured")


# -----------------------------------------------------------------------------
# Local provider

@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "seoul.md").write_text("# Seoul weather\n\nSunny and 27 degrees in Seoul today, light wind.\n")
    (folder / "busan.md").write_text("# Busan weather\n\nRain showers in Busan, 22 degrees, strong wind.\n")
    (folder / "gold.txt").write_text("Gold prices\nGold trades at 2345 dollars an ounce; silver at 29.\n")
    (folder / "sub" / "people.jsonl").write_text(
        json.dumps({"title": "Mayor of Port Elsworth", "text": "Dana Reyes is the mayor of Port Elsworth."}) + "\n"
        + "\n" + json.dumps({"text": "The Zephyr Cup final ended Harbor City 3, Millbrook 1."}) + "\n")
    pq.write_table(pa.table({"title": ["Bitcoin", "Tokyo weather"],
                             "text": ["Bitcoin trades at 104250 dollars, up 2 percent.",
                                      "Tokyo has rainy season showers and 21 degrees."]}), folder / "market.parquet")
    (folder / ".hidden.md").write_text("secret zephyr notes")
    (folder / "notes.csv").write_text("zephyr,csv,is,not,indexed")
    return folder


def _names(results):
    return [urlparse(r["url"]).path.rsplit("/", 1)[1] + ("#" + urlparse(r["url"]).fragment
                                                          if urlparse(r["url"]).fragment else "") for r in results]


@pytest.mark.parametrize("query, best", [
    ("what's the weather in Seoul", "seoul.md"),
    ("is it raining in Busan", "busan.md"),
    ("price of gold", "gold.txt"),
    ("who is the mayor of Port Elsworth", "people.jsonl#row=0"),
    ("Zephyr Cup final score", "people.jsonl#row=1"),
    ("bitcoin price today", "market.parquet#row=0"),
    ("Tokyo weather", "market.parquet#row=1"),
])
def test_local_ranks_the_right_document_first(docs, query, best):
    results = LocalSearchProvider(docs).search(query, k=3)
    assert _names(results)[0] == best


def test_local_results_have_file_urls_titles_and_content(docs):
    provider = LocalSearchProvider(docs)
    seoul = provider.search("Seoul", 5)
    assert seoul == [{"title": "Seoul weather", "url": (docs / "seoul.md").as_uri(),
                      "content": "Sunny and 27 degrees in Seoul today, light wind."}]
    assert Path(unquote(urlparse(seoul[0]["url"]).path)).read_text().startswith("# Seoul weather")
    zephyr = provider.search("Zephyr", 5)  # hidden files and other extensions are not indexed
    assert [(r["title"], r["url"]) for r in zephyr] == [("people.jsonl row 1",
                                                        (docs / "sub" / "people.jsonl").as_uri() + "#row=1")]
    weather = provider.search("weather", 10)
    assert set(_names(weather)) == {"seoul.md", "busan.md", "market.parquet#row=1"}


@pytest.mark.parametrize("query", ["quantum chromodynamics", "the of and", "???"])
def test_local_no_match_is_empty(docs, query):
    assert LocalSearchProvider(docs).search(query, 5) == []


def test_local_empty_folders_match_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    assert LocalSearchProvider(tmp_path / "empty").search("weather", 3) == []
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("the of and\n")
    assert LocalSearchProvider(tmp_path / "blank").search("weather", 3) == []


def test_local_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(SearchError, match="does not exist"):
        LocalSearchProvider(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rows.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(SearchError, match=r"rows.jsonl:2: invalid JSON"):
        LocalSearchProvider(tmp_path / "bad").search("ok", 1)
    (tmp_path / "bad" / "rows.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(SearchError, match="no 'text' or 'content'"):
        LocalSearchProvider(tmp_path / "bad").search("ok", 1)
    (tmp_path / "bad" / "rows.jsonl").unlink()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad" / "t.parquet")
    with pytest.raises(SearchError, match=r"no 'text' or 'content' column \(columns: \['body'\]\)"):
        LocalSearchProvider(tmp_path / "bad").search("ok", 1)
    with pytest.raises(SearchError, match="non-empty query"):
        LocalSearchProvider(tmp_path).search("  ", 1)


def test_local_index_is_cached_and_reused(docs, monkeypatch):
    first = LocalSearchProvider(docs)
    expected = [first.search(q, 3) for q in ("Seoul weather", "gold", "Zephyr Cup")]
    index_dir = first.index_dir()
    assert os.path.isfile(os.path.join(index_dir, "documents.jsonl"))
    assert index_dir.startswith(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "search_index"))

    def no_rebuild(*args):
        raise AssertionError("the cached index should have been loaded, not rebuilt")
    monkeypatch.setattr(web_search, "_build_index", no_rebuild)
    second = LocalSearchProvider(docs)  # a new process would do the same: load from disk
    assert [second.search(q, 3) for q in ("Seoul weather", "gold", "Zephyr Cup")] == expected


def test_local_cache_is_invalidated_when_a_file_changes(docs):
    provider = LocalSearchProvider(docs)
    assert provider.search("blizzard", 3) == []
    old_index = provider.index_dir()
    gold = docs / "gold.txt"
    stat = gold.stat()
    gold.write_text("Gold prices\nA blizzard closed the gold market.\n")
    os.utime(gold, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _names(provider.search("blizzard", 3)) == ["gold.txt"]
    assert provider.index_dir() != old_index and not os.path.exists(old_index)  # stale index removed
    (docs / "new.md").write_text("# Snow\n\nA blizzard in Seoul.\n")  # a new file counts too
    assert set(_names(provider.search("blizzard", 3))) == {"gold.txt", "new.md"}
    gold.unlink()  # and a removed one
    assert _names(provider.search("blizzard", 3)) == ["new.md"]


def test_local_provider_from_env(docs, monkeypatch):
    monkeypatch.delenv("NANOCHAT_SEARCH_URL", raising=False)
    monkeypatch.setenv("NANOCHAT_SEARCH_DOCS", str(docs))
    assert _names(provider_from_env().search("gold", 1)) == ["gold.txt"]
    monkeypatch.delenv("NANOCHAT_SEARCH_DOCS")
    assert provider_from_env() is None


@pytest.mark.parametrize("query, best", [
    ("what's the weather in Seoul", "weather_seoul.md"),
    ("who is the mayor of Port Elsworth", "mayor_port_elsworth.md"),
    ("who won the Zephyr Cup final", "zephyr_cup_final.md"),
    ("bitcoin price today", "price_bitcoin.md"),
])
def test_demo_documents_answer_demo_questions(query, best):
    files = os.listdir(DEMO_DOCS_DIR)
    assert 20 <= len(files) <= 40 and all(f.endswith((".md", ".txt")) for f in files)
    results = LocalSearchProvider(DEMO_DOCS_DIR).search(query, 3)
    assert results[0]["url"].endswith("/" + best)
    assert "demo data" in results[0]["content"]
    assert len(run_web_search(LocalSearchProvider(DEMO_DOCS_DIR), query)) <= web_search.DEFAULT_TOOL_OUTPUT_CHARS


# -----------------------------------------------------------------------------
# Classifier

NEEDS_SEARCH = [
    "what's the weather in Seoul", "What is the weather like in Tokyo today?", "is it sunny in Paris",
    "weather forecast for Paris this weekend", "is it going to rain tomorrow in London",
    "latest news about the election", "What are today's headlines?", "what times does the museum open today",
    "what is the current price of bitcoin", "bitcoin price", "how much is a gallon of gas", "stock price of apple",
    "Disney plus price", "what is the exchange rate from usd to eur",
    "who won the game last night", "what was the score of the Lakers game", "who won the 2024 election",
    "who is the president of France", "who is the current prime minister of Japan", "who is the ceo of openai",
    "latest python release", "what is the population of Tokyo now",
]
NO_SEARCH = [
    "what is your name", "who made you", "who are you", "tell me about yourself",
    "what is 23 * 47", "23 × 47", "what is 12 times 4", "calculate a 17% tip on $45", "what is 15% of 80",
    "compound interest on $1000 at 5%",
    "what is inflation", "what is photosynthesis", "define entropy", "what is a black hole",
    "what is the capital of France", "what is the difference between weather and climate",
    "how do airplanes fly", "how does the stock market work", "why is the sky blue", "how do hurricanes form",
    "explain how a rainbow forms",
    "write a poem about the weather", "tell me a joke", "write a story about a king",
    "write a python function to reverse a string", "how do I sort a list in python", "fix this bug in my code",
    "who was the first president of the United States", "hello", "thanks!", "",
    # arithmetic and calendar questions that mention prices, "today" or a year (the think/tool data's questions)
    "A $209 jacket is 50% off. What is the sale price?", "Sam saves $27 a week for 6 weeks. How much is left?",
    "If today is Friday, what day of the week will it be in 3 days?", "What date is 47 days after 23 June 2027?",
    "What day of the week is ten days before a Tuesday?", "Who am I chatting with right now?",
]


@pytest.mark.parametrize("query", NEEDS_SEARCH)
def test_needs_web_search_for_current_facts(query):
    assert needs_web_search(query) is True


@pytest.mark.parametrize("query", NO_SEARCH)
def test_no_web_search_for_what_the_model_knows(query):
    assert needs_web_search(query) is False


def _conversation(*user_turns):
    messages = [{"role": "system", "content": "You are nanochat."}]
    for turn in user_turns:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "(answer)"}]
    return messages[:-1]


@pytest.mark.parametrize("turns, expected", [
    # the pronoun becomes the subject of the most recent turn that names one
    (("Who is the president of France?", "How old is he?"), (True, "How old is the president of France?")),
    (("Who is the president of France?", "tell me more about him"),
     (True, "tell me more about the president of France")),
    (("Who is the CEO of Northwind Robotics?", "thanks", "what is his salary"),
     (True, "what is the CEO of Northwind Robotics's salary")),
    (("Who won the Zephyr Cup final?", "tell me more about it"), (True, "tell me more about Zephyr Cup")),
    (("what is the price of bitcoin", "why did it drop"), (True, "why did the price of bitcoin drop")),
    (("Tell me about Marie Curie", "What did she discover?"), (False, "What did Marie Curie discover?")),
    (("Tell me about Marie Curie", "what was her age when she died"),
     (False, "what was Marie Curie's age when Marie Curie died")),
    (("Who is Elena Marsh?", "Tell me more about her"), (False, "Tell me more about Elena Marsh")),
    (("who is marie curie", "what did she discover"), (False, "what did marie curie discover")),
    # weather's "it" points at nothing; a query with its own subject keeps it
    (("Who is the mayor of Seoul?", "is it going to rain tomorrow?"), (True, "is it going to rain tomorrow?")),
    (("Who is Elena Marsh?", "Is he the mayor of Port Elsworth?"), (True, "Is he the mayor of Port Elsworth?")),
    (("Who is the president of France?", "what's the weather in Seoul"), (True, "what's the weather in Seoul")),
    # identity veto: the earlier turns were about the assistant
    (("what is your name?", "who made it?"), (False, "who made it?")),
    (("Who are you?", "tell me more about it"), (False, "tell me more about it")),
    (("Who is the president of France?", "What is your name?", "how old is he"), (False, "how old is he")),
    # nothing to resolve
    (("how old is he?",), (False, "how old is he?")),
    ((), (False, "")),
])
def test_needs_web_search_contextual(turns, expected):
    assert needs_web_search_contextual(_conversation(*turns)) == expected
