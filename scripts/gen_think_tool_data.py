"""
Synthetic SFT conversations that teach one assistant turn to think, call tools and answer (offline, seeded).

    python -m scripts.gen_think_tool_data --output think_tool_train.jsonl --rows 4000 --seed 0
    python -m scripts.gen_think_tool_data --output think_tool_val.jsonl --rows 200 --seed 1 --max-seq-len 512
    python -m scripts.chat_sft --extra-train-jsonl think_tool_train.jsonl:2 --extra-val-jsonl think_tool_val.jsonl ...

Patterns (their share of the rows in PATTERN_WEIGHTS):
  search      think -> web_search over a document folder (JSON call) -> an answer taken from the top result
  followup    a search turn, then "tell me more about him/her/it", resolved from the earlier turn -> a second search
  calculator  think -> calculator (tips, percentages, discounts, compound interest, products) -> answer
  multistep   multi-step arithmetic worked in the think block -> calculator on the whole expression -> answer
  dates       day-of-week and date arithmetic worked in the think block -> answer
  travel      distance / speed / arrival time worked in the think block -> answer
  direct      think -> answer with no tool (explanations and definitions, the questions not to search)
  identity    think -> answer about the assistant itself (nanochat's persona file, with a think block added)

A share of the rows (--think-off-frac) write the empty think block, the Engine's think="off" prefill, so the
model learns to answer (or call a tool) right after it. The tool outputs come from the real tools: the calculator,
and LocalSearchProvider + format_results at the Engine's budget for --max-seq-len (nanochat.tools.
web_search_budget), so training outputs look like inference ones; the search query is the one the Engine's "auto"
mode would search (needs_web_search_contextual), and a question is only used when the classifier agrees it needs a
search and its document ranks first; the other patterns keep only questions the classifier says need none, so the
data never contradicts the "auto" search mode. Every row passes nanochat.chat_format.validate_conversation, else the run
stops. The same seed gives the same file. The demo documents (nanochat/data/search_docs) are fictional.
"""

import argparse
import datetime
import json
import os
import random
import re
import sys
import time

from nanochat.chat_format import load_conversations_jsonl, think_block, validate_conversation
from nanochat.fileio import atomic_open
from nanochat.search_classifier import needs_web_search, needs_web_search_contextual, subject_of
from nanochat.tools import calculator_tool, tool_call_json, web_search_budget
from nanochat.web_search import DEMO_DOCS_DIR, LocalSearchProvider, format_results

PATTERN_WEIGHTS = {"search": 5, "followup": 2, "calculator": 4, "multistep": 2, "dates": 2, "travel": 1,
                   "direct": 3, "identity": 1}
SEARCH_PATTERNS = ("search", "followup")  # the others answer questions the classifier says need no search
IDENTITY_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "data",
                             "identity_conversations.jsonl")


def text(value):
    return {"type": "text", "text": value}


def tool_turn(reasoning, calls, answer):
    """An assistant message: think block, then (call, output) pairs, then the answer."""
    parts = [text(think_block(reasoning))]
    for code, output in calls:
        parts += [{"type": "python", "text": code}, {"type": "python_output", "text": output}]
    return parts + [text(answer)]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


# -----------------------------------------------------------------------------
# Search: questions about each document of the folder

WEATHER_QUESTIONS = ["What's the weather in {place}?", "What is the weather like in {place} today?",
                     "How's the weather in {place} right now?", "Is it going to rain in {place} today?",
                     "What's the temperature in {place} today?", "weather in {place} today?"]
OFFICE_QUESTIONS = ["Who is the {office} of {org}?", "Who is the current {office} of {org}?",
                    "Who's the {office} of {org} right now?", "who is the {office} of {org}"]
PRICE_QUESTIONS = ["What is the price of {item} today?", "How much is {item} right now?",
                   "What's the current {item} price?", "What does {item} cost today?"]
NEWS_QUESTIONS = ["What's the latest on {topic}?", "Any news about {topic}?", "What's the latest news on {topic}?",
                  "Search the news for {topic}."]
SEARCH_THOUGHTS = {
    "weather": ["The user wants the current weather in {place}. Weather changes every day and I cannot know it "
                "from memory, so I will search for it.",
                "Weather in {place} today is a live fact. I should look it up instead of guessing."],
    "office": ["The user asks who the {office} of {org} is. Office holders change, so I should search rather "
               "than rely on memory.",
               "Who holds an office can change. I will look up the {office} of {org}."],
    "price": ["Prices change all the time, so I need a current figure for {item}. I will search.",
              "The user asks for today's {item} price. I cannot know it without looking it up."],
    "news": ["This is about recent events ({topic}), which I cannot know without looking them up. I will search.",
             "The user wants the latest on {topic}. I should search for it."],
}
ANSWER_LEADS = ["According to the search results, ", "Here is what I found: ", "", "The search results say: "]
FOLLOW_UPS = {"him": ["Tell me more about him.", "What else do you know about him?", "Tell me more about him please."],
              "her": ["Tell me more about her.", "What else do you know about her?", "Tell me more about her please."],
              "it": ["Tell me more about it.", "What else do you know about it?"]}


def _sentences(content):
    """A document's sentences, without the demo folder's "Source: ..." line."""
    content = "\n".join(line for line in content.splitlines() if not line.startswith("Source:"))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(content.split())) if s.strip()]


def _as_noun(phrase, content):
    """Lowercase a title's first word unless it starts a name (the next word is capitalized too, or the word is
    capitalized inside the document's sentences)."""
    words = phrase.split()
    first = words[0]
    if (first.isupper() or (len(words) > 1 and words[1][:1].isupper())
            or re.search(rf"[a-z0-9,;:] {re.escape(first)}\b", content)):
        return phrase
    return phrase[0].lower() + phrase[1:]


def describe_document(doc):
    """What a document is about, from its title: (kind, fields) for the question templates."""
    title, content = doc["title"], doc["content"]
    weather = re.match(r"Weather in (.+?) today$", title)
    if weather:
        return "weather", {"place": weather.group(1)}
    office = re.match(r"(.+?) of (?:the )?(.+?): (.+)$", title)
    if office:
        role = office.group(1) if office.group(1).isupper() else office.group(1).lower()
        return "office", {"office": role, "org": office.group(2), "name": office.group(3)}
    if re.search(r"\bprices?\b", title, re.I):
        item = re.sub(r"^Average |\s*\bprices?\b|\s*\btoday\b", "", title, flags=re.I).strip()
        return "price", {"item": _as_noun(item, content)}
    return "news", {"topic": _as_noun(title, content)}


def pronoun_for(kind, content):
    if kind != "office":
        return "it"
    return "her" if re.search(r"\b(?:She|she|her)\b", content) else "him"


class SearchData:
    """The search questions of a document folder, with the outputs the Engine would show for them."""

    def __init__(self, folder, max_seq_len):
        self.provider = LocalSearchProvider(folder)
        self.k, self.max_chars = web_search_budget(max_seq_len)
        self.documents = []  # (doc, kind, fields, [questions whose search ranks this document first])
        self.skipped = 0
        for doc in self.provider.documents():
            kind, fields = describe_document(doc)
            templates = {"weather": WEATHER_QUESTIONS, "office": OFFICE_QUESTIONS, "price": PRICE_QUESTIONS,
                         "news": NEWS_QUESTIONS}[kind]
            questions = [q.format(**fields) for q in templates]
            usable = [q for q in questions if needs_web_search(q) and self.top_url(q) == doc["url"]]
            self.skipped += len(questions) - len(usable)
            if usable:
                self.documents.append((doc, kind, fields, usable))
        if not self.documents:
            raise SystemExit(f"ERROR: no document under {folder} could be found by a question about it; "
                             f"check the folder holds .txt/.md/.jsonl/.parquet documents with titles")

    def top_url(self, query):
        results = self.provider.search(query, 1)
        return results[0]["url"] if results else None

    def call(self, query):
        """(call code, tool output) for one search, exactly as the Engine would run it."""
        return tool_call_json("web_search", query=query), format_results(self.provider.search(query, self.k),
                                                                         self.max_chars)


def visible_sentences(output):
    """The complete sentences of the top result as the model sees it in the tool output (format_results cuts
    long results short: an answer must only say what is visible)."""
    top = output.split("\n\n[2] ", 1)[0].split("\n", 2)
    return [s for s in _sentences(top[2] if len(top) == 3 else "") if not s.endswith("...")]


def search_row(rng, data, entry, max_sentences=2):
    """A question about one document -> think -> web_search -> an answer from what the search shows."""
    doc, kind, fields, questions = entry
    messages = [user(rng.choice(questions))]
    _, query = needs_web_search_contextual(messages)
    code, output = data.call(query)
    sentences = visible_sentences(output)[:max_sentences]
    if not sentences:
        return None
    reasoning = rng.choice(SEARCH_THOUGHTS[kind]).format(**fields)
    answer = rng.choice(ANSWER_LEADS) + " ".join(sentences)
    return messages + [assistant(tool_turn(reasoning, [(code, output)], answer))]


def gen_search(rng, data):
    return search_row(rng, data, rng.choice(data.documents))


def gen_followup(rng, data):
    entry = rng.choice(data.documents)
    doc, kind, fields, _ = entry
    first = search_row(rng, data, entry, max_sentences=1)  # short: two searches must fit a small context
    if first is None:
        return None
    pronoun = pronoun_for(kind, doc["content"])
    messages = first + [user(rng.choice(FOLLOW_UPS[pronoun]))]
    _, query = needs_web_search_contextual(messages)
    subject = subject_of(messages[0]["content"])
    if subject is None or data.top_url(query) != doc["url"]:
        return None  # the follow-up does not resolve to this document: not a grounded example
    code, output = data.call(query)
    sentences = visible_sentences(output)
    if not sentences:
        return None
    name = fields.get("name", subject)
    reasoning = f'"{pronoun}" refers to {subject} from my earlier answer. I will search for more about {name}.'
    answer = f"Here is more about {name}: " + " ".join(sentences[1:] or sentences)
    return messages + [assistant(tool_turn(reasoning, [(code, output)], answer))]


# -----------------------------------------------------------------------------
# Calculator, multi-step arithmetic, dates, travel

def money(value):
    return f"{value:.2f}"


def calculator_call(rng, expression):
    """(code, output): nanochat's bare expression, or (one call in ten) the same as a JSON call."""
    code = expression if rng.random() < 0.9 else tool_call_json("calculator", expression=expression)
    output = calculator_tool(expression)
    assert output is not None, expression
    return code, output


def calculator_problem(rng, kind):
    """(question, expression, reasoning, answer template with {v} for the result) of one kind."""
    if kind == "tip":
        rate, bill = rng.choice([10, 12, 15, 17, 18, 20, 22, 25]), rng.randint(8, 240)
        question = rng.choice(["Calculate a {r}% tip on ${b}.", "What is a {r}% tip on a ${b} bill?",
                               "How much is a {r}% tip on ${b}?", "calculate a {r}% tip on ${b}"])
        return (question.format(r=rate, b=bill), f"{bill} * {rate / 100}",
                f"A {rate}% tip is {rate}% of ${bill}, which is {bill} times {rate / 100}.",
                f"A {rate}% tip on ${bill} is ${{v}}.")
    if kind == "percent":
        rate, amount = rng.choice([5, 8, 12, 15, 25, 30, 35, 40, 60, 75]), rng.randint(20, 900)
        question = rng.choice(["What is {r}% of {a}?", "Calculate {r}% of {a}.", "what's {r} percent of {a}"])
        return (question.format(r=rate, a=amount), f"{amount} * {rate / 100}",
                f"{rate}% of {amount} is {amount} times {rate / 100}.", f"{rate}% of {amount} is {{v}}.")
    if kind == "discount":
        rate, price = rng.choice([10, 15, 20, 25, 30, 40, 50]), rng.randint(15, 400)
        return (f"A ${price} jacket is {rate}% off. What is the sale price?", f"{price} * (1 - {rate / 100})",
                f"{rate}% off means paying {100 - rate}% of ${price}: {price} times (1 - {rate / 100}).",
                "The sale price is ${v}.")
    rate, principal, years = rng.choice([2, 3, 4, 5, 6, 8]), rng.choice([500, 1000, 2000, 2500, 5000]), rng.randint(2, 10)
    return (f"If I invest ${principal} at {rate}% interest compounded yearly, how much will I have after {years} years?",
            f"{principal} * (1 + {rate / 100}) ** {years}",
            f"Compound interest multiplies the amount by 1 + {rate / 100} each year, so after {years} years it is "
            f"{principal} * (1 + {rate / 100}) ** {years}.",
            f"After {years} years you will have ${{v}}.")


def gen_calculator(rng, data=None):
    kind = rng.choice(["tip", "percent", "discount", "compound", "product"])
    if kind == "product":
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        question = rng.choice(["What is {a} × {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.",
                               "what is {a} times {b}"]).format(a=a, b=b)
        code, output = calculator_call(rng, f"{a} * {b}")
        reasoning = f"I need the product of {a} and {b}; the calculator is exact."
        return [user(question), assistant(tool_turn(reasoning, [(code, output)], f"{a} × {b} = {output}."))]
    question, expression, reasoning, answer = calculator_problem(rng, kind)
    code, output = calculator_call(rng, expression)
    reasoning += " I will use the calculator."
    return [user(question), assistant(tool_turn(reasoning, [(code, output)], answer.format(v=money(float(output)))))]


def gen_multistep(rng, data=None):
    kind = rng.choice(["change", "teams", "fuel", "savings"])
    if kind == "change":
        n, price = rng.randint(2, 9), rng.randint(2, 12)
        bill = rng.choice([b for b in (20, 50, 100) if b > n * price] or [200])
        question = f"Anna buys {n} pens at ${price} each and pays with a ${bill} bill. How much change does she get?"
        steps = f"The pens cost {n} × ${price} = ${n * price}. The change is ${bill} − ${n * price} = ${bill - n * price}."
        expression, answer = f"{bill} - {n} * {price}", "She gets ${v} in change."
    elif kind == "teams":
        boys, girls = rng.randint(6, 20), rng.randint(6, 20)
        size = rng.choice([d for d in (2, 3, 4, 5, 6) if (boys + girls) % d == 0] or [1])
        question = f"A class has {boys} boys and {girls} girls. How many teams of {size} can they make?"
        steps = (f"There are {boys} + {girls} = {boys + girls} students. {boys + girls} ÷ {size} = "
                 f"{(boys + girls) // size} teams.")
        expression, answer = f"({boys} + {girls}) / {size}", "They can make {v} teams."
    elif kind == "fuel":
        per100, distance = rng.randint(4, 12), rng.choice([150, 200, 250, 300, 400, 500, 600])
        question = f"A car uses {per100} liters of fuel per 100 km. How much fuel does it need for {distance} km?"
        steps = f"{distance} km is {distance} ÷ 100 = {distance / 100:g} times 100 km, so {distance / 100:g} × {per100} liters."
        expression, answer = f"{distance} / 100 * {per100}", "It needs {v} liters."
    else:
        weekly, weeks, spent = rng.randint(5, 40), rng.randint(3, 12), rng.randint(5, 60)
        question = f"Sam saves ${weekly} a week for {weeks} weeks, then spends ${spent}. How much is left?"
        steps = f"Saved: {weekly} × {weeks} = ${weekly * weeks}. Left: {weekly * weeks} − {spent} = ${weekly * weeks - spent}."
        expression, answer = f"{weekly} * {weeks} - {spent}", "Sam has ${v} left."
    code, output = calculator_call(rng, expression)
    reasoning = steps + " I will check the whole calculation with the calculator."
    return [user(question), assistant(tool_turn(reasoning, [(code, output)], answer.format(v=output)))]


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def gen_weekday(rng):
    day, n, forward = rng.randrange(7), rng.randint(2, 40), rng.random() < 0.5
    n_text = NUMBER_WORDS[n] if n <= 20 and rng.random() < 0.5 else str(n)
    if forward:
        question = rng.choice([f"If today is {DAYS[day]}, what day of the week will it be in {n_text} days?",
                               f"What day of the week is {n_text} days after a {DAYS[day]}?"])
    else:
        question = rng.choice([f"What day of the week is {n_text} days before a {DAYS[day]}?",
                               f"If today is {DAYS[day]}, what day was it {n_text} days ago?"])
    weeks, rest = divmod(n, 7)
    step = 1 if forward else -1
    walk = [DAYS[(day + step * i) % 7] for i in range(1, rest + 1)]
    result = DAYS[(day + step * n) % 7]
    reasoning = (f"{n} days is {weeks} week{'s' if weeks != 1 else ''} and {rest} day{'s' if rest != 1 else ''}. "
                 f"Whole weeks land on {DAYS[day]} again, so I count {rest} day{'s' if rest != 1 else ''} "
                 f"{'forward' if forward else 'back'}" + (f": {', '.join(walk)}." if walk else ".")
                 + f" That gives {result}.")
    return [user(question), assistant(think_block(reasoning) + f"It is a {result}.")]


def gen_date(rng):
    start = datetime.date(rng.randint(2020, 2030), 1, 1) + datetime.timedelta(days=rng.randrange(365))
    n = rng.randint(5, 75)
    end = start + datetime.timedelta(days=n)

    def say(d):
        return f"{d.day} {MONTHS[d.month - 1]} {d.year}"
    steps, current, remaining = [], start, n
    while True:  # walk month by month: the worked reasoning a person would write
        next_month = (current.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
        left = (next_month - current).days - 1  # days after `current` still in its month
        if remaining <= left:
            steps.append(f"{remaining} more day{'s' if remaining != 1 else ''} after {say(current)} is {say(end)}.")
            break
        steps.append(f"{MONTHS[current.month - 1]} has {left} day{'s' if left != 1 else ''} left after the "
                     f"{current.day}, so {remaining} − {left} = {remaining - left - 1} days after 1 "
                     f"{MONTHS[next_month.month - 1]}.")
        current, remaining = next_month, remaining - left - 1
    question = f"What date is {n} days after {say(start)}?"
    return [user(question), assistant(think_block(" ".join(steps)) + f"It is {say(end)}, a {DAYS[end.weekday()]}.")]


def gen_dates(rng, data=None):
    return gen_weekday(rng) if rng.random() < 0.6 else gen_date(rng)


def clock(hour):
    """24-hour float -> '7 pm' / '10:30 am'."""
    hour %= 24
    h, minutes = int(hour), round((hour - int(hour)) * 60)
    suffix, h12 = ("am" if h < 12 else "pm"), (h % 12 or 12)
    return f"{h12}:{minutes:02d} {suffix}" if minutes else f"{h12} {suffix}"


def gen_travel(rng, data=None):
    hours = rng.choice([1, 1.5, 2, 2.5, 3, 4, 5, 6])
    speed = rng.choice([s for s in (30, 40, 45, 50, 55, 60, 65, 70, 80) if float(s * hours).is_integer()])
    distance, leave = int(speed * hours), rng.randint(6, 16)
    vehicle = rng.choice(["A train", "A bus", "A car"])
    question = rng.choice([f"{vehicle} leaves at {clock(leave)} and travels {distance} miles at {speed} mph. "
                           f"When does it arrive?",
                           f"If I drive {distance} miles at {speed} mph and leave at {clock(leave)}, what time do "
                           f"I arrive?"])
    reasoning = (f"Time = distance / speed = {distance} / {speed} = {hours:g} hours. {clock(leave)} plus "
                 f"{hours:g} hours is {clock(leave + hours)}.")
    subject = "You arrive" if question.startswith("If I") else "It arrives"
    return [user(question), assistant(think_block(reasoning) + f"{subject} at {clock(leave + hours)}.")]


# -----------------------------------------------------------------------------
# No tool: explanations, definitions, and the assistant itself

DIRECT = [
    ("How do airplanes fly?", "Wings are shaped and tilted so that air flowing over them is pushed downward; the air "
     "pushes the wing up in return (lift), while the engines provide thrust to keep air moving over the wings."),
    ("Why is the sky blue?", "Sunlight is scattered by the molecules in the air, and blue light is scattered much "
     "more than red light, so blue reaches our eyes from every direction of the sky."),
    ("What is photosynthesis?", "Photosynthesis is how plants make food: they use sunlight to turn water and carbon "
     "dioxide into sugar, releasing oxygen."),
    ("How does a refrigerator work?", "A refrigerator pumps heat out: a fluid evaporates inside and absorbs heat, "
     "then a compressor squeezes it so it releases that heat through the coils at the back."),
    ("What is gravity?", "Gravity is the attraction between masses. It keeps us on the ground and the Moon in orbit "
     "around the Earth."),
    ("Why do we have seasons?", "The Earth's axis is tilted, so during the year each hemisphere leans toward the Sun "
     "(summer) or away from it (winter)."),
    ("What is a prime number?", "A prime number is a whole number greater than 1 whose only divisors are 1 and "
     "itself, like 2, 3, 5, 7 and 11."),
    ("How do vaccines work?", "A vaccine shows the immune system a harmless piece or version of a germ, so it learns "
     "to recognize and fight the real germ quickly later."),
    ("What does a CPU do?", "The CPU is the part of a computer that runs programs: it fetches instructions and "
     "carries them out, doing arithmetic and moving data."),
    ("Why does ice float?", "Water expands when it freezes, so ice is less dense than liquid water and floats on it."),
    ("What is inflation?", "Inflation is a general rise in prices over time, which means the same money buys less."),
    ("How do rainbows form?", "Sunlight enters raindrops, bends and reflects inside them, and splits into its colors, "
     "which we see as an arc when the Sun is behind us."),
    ("What is DNA?", "DNA is the molecule that carries the genetic instructions of living things, written as a "
     "sequence of four chemical letters."),
    ("How does a compass work?", "A compass needle is a small magnet that lines up with the Earth's magnetic field, "
     "so one end points north."),
    ("Why do leaves change color in autumn?", "As days shorten, trees stop making green chlorophyll, revealing the "
     "yellow and orange pigments that were there all along."),
    ("What is the difference between weather and climate?", "Weather is what the atmosphere does on a given day; "
     "climate is the average pattern of weather over many years."),
    ("How do batteries store energy?", "A battery stores energy chemically: when it is connected, a chemical reaction "
     "moves electrons through the circuit from one terminal to the other."),
    ("What is an atom?", "An atom is the smallest unit of a chemical element: a nucleus of protons and neutrons with "
     "electrons around it."),
    ("Why do we sleep?", "Sleep lets the body and brain recover: it helps memory, repairs tissue and keeps the immune "
     "system working."),
    ("How do magnets work?", "In a magnet, the tiny magnetic fields of many electrons line up in the same direction, "
     "adding up to a field that attracts iron and other magnets."),
    ("What is a black hole?", "A black hole is a region where matter is packed so densely that gravity lets nothing, "
     "not even light, escape."),
    ("How does the internet work?", "The internet is a network of networks: computers split data into packets, and "
     "routers pass each packet along until it reaches its destination."),
    ("What is evaporation?", "Evaporation is when a liquid turns into a gas at its surface, like water drying from "
     "a puddle."),
    ("Why is the ocean salty?", "Rivers carry dissolved minerals from rocks into the sea; when seawater evaporates "
     "the salt stays behind, so it builds up."),
    ("How do bees make honey?", "Bees collect nectar from flowers, add enzymes, and store it in wax cells where "
     "fanning wings evaporate water until it thickens into honey."),
    ("What is a verb?", "A verb is a word for an action or a state, like run, think or is."),
    ("How does a thermometer work?", "A thermometer measures how something changes with temperature, such as liquid "
     "expanding in a tube or the resistance of a metal."),
    ("What is friction?", "Friction is the force that resists two surfaces sliding against each other."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nthe tide breathes in and breathes out,\nsalt on the "
     "cold wind."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
]
DIRECT_THOUGHTS = ["This asks how something works or what something means. It does not change over time, so I can "
                   "answer from what I know, without a tool.",
                   "No search is needed: this is general knowledge that stays the same. I will explain it briefly.",
                   "This is not about current events and needs no calculation, so I answer directly."]


def gen_direct(rng, data=None):
    question, answer = rng.choice(DIRECT)
    return [user(question), assistant(think_block(rng.choice(DIRECT_THOUGHTS)) + answer)]


def make_identity(conversations):
    singles = [c["messages"] for c in conversations
               if len(c["messages"]) == 2 and isinstance(c["messages"][1]["content"], str)]

    def gen_identity(rng, data=None):
        question, reply = rng.choice(singles)
        reasoning = "The user asks about me, the assistant. I know who I am; no search or tool is needed."
        return [user(question["content"]), assistant(think_block(reasoning) + reply["content"])]
    return gen_identity


# -----------------------------------------------------------------------------
# Rows

def without_reasoning(messages):
    """The same conversation with every think block emptied: the think="off" form."""
    def empty(value):
        return re.sub(r"<think>\n.*?\n</think>\n", think_block(""), value, flags=re.S)
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] == "assistant":
            content = empty(content) if isinstance(content, str) else [
                {**p, "text": empty(p["text"])} if p["type"] == "text" else p for p in content]
        out.append({"role": message["role"], "content": content})
    return out


def generate_rows(num_rows, seed, data, think_off_frac, generators):
    """num_rows validated rows {"messages": [...], "pattern": name}; the same seed gives the same rows."""
    rng = random.Random(seed)
    names = list(PATTERN_WEIGHTS)
    weights = [PATTERN_WEIGHTS[n] for n in names]
    rows, attempts = [], 0
    while len(rows) < num_rows:
        attempts += 1
        if attempts > 20 * num_rows + 100:
            raise SystemExit(f"ERROR: only {len(rows)} of {num_rows} rows after {attempts} attempts")
        name = rng.choices(names, weights)[0]
        messages = generators[name](rng, data)
        if messages is None or (name not in SEARCH_PATTERNS and needs_web_search_contextual(messages[:-1])[0]):
            continue  # no grounded example, or a tool-less answer to what "auto" mode would search
        if rng.random() < think_off_frac:
            messages = without_reasoning(messages)
        problems = validate_conversation(messages)
        if problems:
            raise AssertionError(f"generated an invalid {name} row (a bug in this script): {problems}\n{messages}")
        rows.append({"messages": messages, "pattern": name})
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write (one conversation per line)")
    parser.add_argument("--rows", type=int, default=4000, help="number of conversations")
    parser.add_argument("--seed", type=int, default=0, help="random seed (use another one for a validation file)")
    parser.add_argument("--docs", default=DEMO_DOCS_DIR,
                        help="document folder the search rows search (default: the fictional demo documents)")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="context of the model to train: sizes the search outputs as the Engine will")
    parser.add_argument("--think-off-frac", type=float, default=0.2,
                        help="share of rows written with an empty think block (the think='off' form)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.rows < 1 or not 0.0 <= args.think_off_frac <= 1.0:
        print("ERROR: --rows must be >= 1 and --think-off-frac within [0, 1]", file=sys.stderr)
        return 2
    if not os.path.isdir(args.docs):
        print(f"ERROR: --docs {args.docs} is not a folder of documents", file=sys.stderr)
        return 2
    t0 = time.time()
    data = SearchData(args.docs, args.max_seq_len)
    generators = {"search": gen_search, "followup": gen_followup, "calculator": gen_calculator,
                  "multistep": gen_multistep, "dates": gen_dates, "travel": gen_travel, "direct": gen_direct,
                  "identity": make_identity(load_conversations_jsonl(IDENTITY_FILE))}
    rows = generate_rows(args.rows, args.seed, data, args.think_off_frac, generators)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_open(args.output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = {name: sum(r["pattern"] == name for r in rows) for name in PATTERN_WEIGHTS}
    print(f"wrote {len(rows)} rows to {args.output} in {time.time() - t0:.1f}s: "
          + ", ".join(f"{n} {c}" for n, c in counts.items())
          + f" ({len(data.documents)} searchable documents; {data.skipped} question forms skipped: the classifier "
            f"said no search or another document ranked first)")
    print(json.dumps({"rows": len(rows), "patterns": counts, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
