"""
Does this question need a web search? Rules, not a model: readable, instant, the same on every machine, and easy
to extend by adding a word to a list. Used by the Engine/CLI/server "auto" web_search mode and by the data
generator; nanochat.web_search re-exports both functions under the same names.

needs_web_search(query) -> bool, checked in this order:
  1. never: questions about the assistant itself, arithmetic (tips, discounts, change, calendar arithmetic on a
     given day), code, creative writing (the model answers these);
  2. yes:   words about now ("latest", "current", "today", "this week", a recent year ...);
  3. never: explanations and definitions ("how do airplanes fly", "what is inflation"), past office holders;
  4. yes:   time-sensitive topics (weather, news, prices, scores) and office holders ("the mayor of Seoul");
  5. otherwise no.

needs_web_search_contextual(messages) -> (bool, query): a follow-up such as "tell me more about him" is resolved
against the subject of the most recent earlier user turn that names one (the pronoun is replaced, so the query
can be searched on its own), and it needs a search when either the resolved query or that earlier turn does.
When the earlier turn was about the assistant ("what is your name?" ... "who made it?") nothing is searched.
"""

import re


def _any_of(*patterns):
    """One case-insensitive regex matching any of the patterns as whole words."""
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.IGNORECASE)


# 1. Never searched -----------------------------------------------------------------------------------------------

ABOUT_THE_ASSISTANT = _any_of(
    r"your (?:name|creator|maker|makers|purpose|model|training|architecture|version|parameters|weights)",
    r"who (?:made|created|built|trained|developed|designed|wrote|owns) you",
    r"(?:who|what) are you", r"are you (?:a|an|human|real|alive|conscious|sentient|chatgpt|nanochat)",
    r"about yourself", r"introduce yourself", r"what can you do",
    r"who am i (?:chatting|talking|speaking) (?:with|to)")

ARITHMETIC = _any_of(
    r"calculate", r"compute", r"solve", r"multiply", r"multiplied by", r"divided by", r"\d+ (?:times|plus|minus) \d+",
    r"square root", r"cube root", r"squared", r"cubed", r"sum of", r"product of", r"tip on",
    r"\d+(?:\.\d+)?\s*% (?:tip|of|off)", r"compound interest", r"sale price", r"how much (?:is|are) left",
    r"how much change", r"how many (?:days|hours|minutes|weeks) (?:are|is|until|between)")
# "if today is Friday, what day is it in 3 days", "what date is 45 days after 3 March 2025": calendar arithmetic on
# a day the question itself gives, whatever words about now ("today", a year) it holds
WEEKDAY = r"(?:mon|tues|wednes|thurs|fri|satur|sun)day"
DATE_ARITHMETIC = re.compile(rf"\bif today is (?:a )?{WEEKDAY}\b|\bdays? (?:before|after|from) (?:a |an )?{WEEKDAY}\b"
                             r"|\bwhat (?:date|day) (?:is|was|will it be) \w+ (?:days?|weeks?) (?:before|after|from)\b",
                             re.IGNORECASE)
# "what is 23 * 47?", "23x47", "2^10": the whole question is numbers and operators
BARE_EXPRESSION = re.compile(r"^(?:(?:what(?:'s| is)|how much is|calculate|compute)\s+)?[\d\s.,+\-*/x×÷^%()=]+\??$",
                             re.IGNORECASE)

CODE_REQUEST = re.compile(
    r"\b(?:write|implement|code|fix|debug|refactor|optimi[sz]e|review|rewrite|translate)\b.*"
    r"\b(?:code|function|script|program|class|method|regex|sql|query|snippet|algorithm|unit tests?|bash|python|"
    r"javascript|typescript|java|c\+\+|rust|golang|html|css|bug)\b"
    r"|\b(?:in|using) (?:python|javascript|typescript|java|c\+\+|rust|golang|sql|bash)\b"
    r"|```|\bdef \w+\(|\btraceback\b|\bstack trace\b|\bsyntax error\b",
    re.IGNORECASE)

CREATIVE_REQUEST = re.compile(
    r"\b(?:write|compose|draft|create|make up|invent|generate|tell)\b(?: me| us)?(?: a| an| some| another)?"
    r"(?: short| long| funny| little| new| sad| happy| rhyming)?\s*"
    r"(?:poem|poems|story|stories|haiku|song|lyrics|limerick|joke|jokes|essay|letter|email|speech|toast|slogan|"
    r"tagline|riddle|sonnet|rap|fable|tale|dialogue|screenplay|novel|verse)\b"
    r"|\b(?:imagine|pretend|brainstorm|role-?play)\b",
    re.IGNORECASE)

# 2. Words about now ---------------------------------------------------------------------------------------------

ABOUT_NOW = _any_of(
    r"latest", r"current", r"currently", r"today", r"today's", r"tonight", r"tomorrow", r"yesterday", r"now",
    r"right now", r"at the moment", r"these days", r"nowadays", r"recent", r"recently", r"breaking",
    r"upcoming", r"so far", r"as of", r"up[- ]to[- ]date",
    r"this (?:week|weekend|month|year|morning|afternoon|evening|season)", r"last (?:night|week|weekend|month)",
    r"next (?:week|weekend|month|game|match|election)", r"20[2-9]\d")

# 3. Explanations, definitions, the past --------------------------------------------------------------------------

EXPLANATION = re.compile(
    r"\bhow (?:do|does|did|can|could|would|is|are)\b.*\b(?:work|works|made|formed|form|fly|flies|happen|happens|"
    r"grow|grows|function|operate|move|breathe|evolve|get made)\b"
    r"|\bwhy (?:do|does|did|is|are|was|were|can|can't|don't|doesn't)\b"
    r"|\bexplain\b|\bwhat does .+ mean\b|\bdefine\b|\bdefinition of\b|\bmeaning of\b|\bwhat causes\b"
    r"|\bhow to\b|\bhow (?:do|can) (?:i|you|we)\b|\bdifference between\b|\bwhat is the purpose of\b",
    re.IGNORECASE)
# "what is inflation", "what are black holes": a short bare noun phrase, no "the" (that would be "what is the
# price of gold", a lookup)
DEFINITION = re.compile(r"^(?:so |and |ok,? )?what(?:'s| is| are) (?:a |an )?(?!the\b)[\w-]+(?: [\w-]+){0,2}\s*\??$",
                        re.IGNORECASE)
PAST_OFFICE = _any_of(r"who was", r"who were", r"(?:first|former|past|founding|previous|late|\d+(?:st|nd|rd|th)) "
                      r"(?:president|prime minister|king|queen|emperor|ceo|mayor|chancellor|pope|leader)")

# 4. Time-sensitive topics and office holders ---------------------------------------------------------------------

CURRENT_TOPIC = _any_of(
    # weather
    r"weather", r"forecast", r"temperature", r"raining", r"snowing", r"rain", r"snow", r"humidity", r"sunny",
    r"heatwave", r"air quality", r"pollen", r"uv index", r"typhoon", r"storm",
    # news and events
    r"news", r"headlines?", r"announced", r"announcement", r"elections?", r"polls?", r"happening", r"traffic",
    r"flight status", r"delays?", r"opening hours", r"open on",
    # prices and markets
    r"prices?", r"cost of", r"costs?", r"how much (?:is|are) (?:a |an |the |one )?(?!\d)\w+", r"stocks?",
    r"share price", r"market cap", r"exchange rate", r"trading at", r"bitcoin", r"ethereum", r"crypto",
    r"interest rates?", r"mortgage rates?", r"inflation rate", r"gas prices?", r"dow jones", r"nasdaq", r"s&p 500",
    # sports
    r"scores?", r"who won", r"won the", r"winner of", r"winners", r"standings", r"league table", r"fixtures?",
    r"playoffs?", r"cup final", r"finals", r"championship", r"tournament", r"world cup", r"super bowl",
    r"olympics", r"grand prix")

OFFICES = (r"president|vice president|prime minister|pm|chancellor|premier|ceo|cfo|cto|chair|chairman|chairwoman|"
           r"chairperson|mayor|governor|senator|king|queen|monarch|emperor|pope|leader|head of state|head coach|"
           r"coach|manager|captain|secretary[- ]general|secretary of state|minister of \w+|foreign minister|"
           r"finance minister|speaker|director|owner")
OFFICE_HOLDER = re.compile(rf"\bwho(?:'s| is| are) (?:the )?(?:current )?(?:{OFFICES})\b|\b(?:{OFFICES}) of\b",
                           re.IGNORECASE)


def _normalize(text):
    return re.sub(r"\s+", " ", str(text).replace("\u2019", "'").replace("\u2018", "'")).strip()


def needs_web_search(query):
    """True when answering needs facts that change over time (weather, news, prices, scores, office holders,
    anything "latest"/"current"/"today"); False for the assistant itself, arithmetic, code, creative writing,
    definitions and explanations."""
    text = _normalize(query)
    if not text:
        return False
    if (ABOUT_THE_ASSISTANT.search(text) or ARITHMETIC.search(text) or BARE_EXPRESSION.match(text)
            or DATE_ARITHMETIC.search(text) or CODE_REQUEST.search(text) or CREATIVE_REQUEST.search(text)):
        return False
    if ABOUT_NOW.search(text):
        return True
    if EXPLANATION.search(text) or DEFINITION.match(text) or PAST_OFFICE.search(text):
        return False
    return bool(CURRENT_TOPIC.search(text) or OFFICE_HOLDER.search(text))


# -----------------------------------------------------------------------------
# Follow-ups: who is "he", what is "it"

PRONOUN = re.compile(r"\b(?:he|she|him|her|his|it|its)\b", re.IGNORECASE)
# "is it going to rain", "it's cold": weather's "it" refers to nothing
WEATHER_IT = re.compile(r"\bit(?:'s| is| was| will be| be)?(?: going to| gonna)? (?:\w+ )?(?:rain|raining|snow|snowing|"
                        r"sunny|cloudy|windy|cold|hot|warm|freezing|humid|stormy)\b", re.IGNORECASE)
# "her" is possessive ("her age") unless what follows is a preposition, an adverb or the end of the question
HER_AS_OBJECT_NEXT = {"", "and", "or", "about", "to", "in", "on", "at", "for", "from", "with", "again", "now", "today",
                      "yesterday", "recently", "more", "please", "up", "out", "back", "though", "too", "yet"}

OFFICE_OF_PLACE = re.compile(
    rf"\b(?:the )?(?:current )?(?:{OFFICES}) of (?:the )?[\w.&'-]+(?: (?!(?:right|now|today|currently|in|at|and|or|"
    rf"this|these|is|was|and)\b)[\w.&'-]+){{0,3}}",
    re.IGNORECASE)
# A run of capitalized words ("Marie Curie", "Bank of Korea"), allowing lowercase particles inside
NAME = re.compile(r"\b[A-Z][\w'.-]*(?: (?:(?:of|de|da|del|van|von|der|den|la|le|bin|al|the|and|&) )?[A-Z][\w'.-]*)*")
# Capitalized because they start a sentence, not because they are names
NOT_NAMES = {
    "i", "a", "an", "the", "who", "whom", "whose", "what", "what's", "when", "where", "which", "why", "how", "is",
    "are", "was", "were", "do", "does", "did", "can", "could", "would", "should", "will", "shall", "may", "might",
    "tell", "explain", "describe", "give", "show", "find", "search", "list", "summarize", "compare", "define",
    "calculate", "please", "thanks", "thank", "hi", "hello", "hey", "ok", "okay", "so", "and", "but", "also", "now",
    "then", "yes", "no", "let's", "look", "write", "i'm", "i'd", "any", "has",
    "have", "had", "in", "on", "at", "for", "about", "of", "to", "it", "he", "she", "his", "her", "its", "my",
}
# "who is marie curie", "tell me about the eiffel tower": the thing asked about, when nothing is capitalized
ASKED_ABOUT = re.compile(r"(?:^(?:who|what) (?:is|was|are|were) |\b(?:tell me|talk|know|learn) (?:more )?about )"
                         r"(?P<subject>[\w .&'-]+?)\s*[?.!]*$", re.IGNORECASE)
NOT_A_SUBJECT = re.compile(r"\b(?:you|your|yours|yourself|me|my|i|we|our|us|this|that|there|these|those)\b|\d",
                           re.IGNORECASE)


def _names(text):
    """Capitalized names in the text, sentence-initial question words and verbs dropped."""
    names = []
    for match in NAME.finditer(text):
        words = match.group().split(" ")
        while words and words[0].lower().rstrip("?,.!") in NOT_NAMES:
            words = words[1:]
        name = " ".join(words).strip("?,.!'")
        if name and name.lower() not in NOT_NAMES:
            names.append(name)
    return names


def subject_of(text):
    """What a user turn asks about: an office ("the president of France"), else the first capitalized name
    ("Marie Curie"), else the object of "who is ..."/"tell me about ..."; None when it names nothing."""
    text = _normalize(text)
    office = OFFICE_OF_PLACE.search(text)
    if office:
        return office.group().strip(" ?.!,")
    names = _names(text)
    if names:
        return names[0]
    asked = ASKED_ABOUT.search(text)
    if asked:
        subject = asked.group("subject").strip()
        if subject and len(subject.split()) <= 6 and not NOT_A_SUBJECT.search(subject) and not PRONOUN.search(subject):
            return subject
    return None


def _refers_back(text):
    """True when the text holds a pronoun that points at something said before (not weather's "it")."""
    return bool(PRONOUN.search(WEATHER_IT.sub(" ", text)))


def resolve_pronouns(text, subject):
    """Replace he/she/him/her/his/it/its in text by the subject ("his age" -> "Marie Curie's age")."""
    protected = [m.span() for m in WEATHER_IT.finditer(text)]

    def replace(match):
        if any(start <= match.start() < end for start, end in protected):
            return match.group()
        word = match.group().lower()
        if word in ("his", "its"):
            return f"{subject}'s"
        if word == "her":
            following = re.match(r"\s*([\w']*)", text[match.end():]).group(1).lower()
            return subject if following in HER_AS_OBJECT_NEXT else f"{subject}'s"
        return subject

    return PRONOUN.sub(replace, text)


def _text_of(message):
    content = message.get("content", "")
    if isinstance(content, list):  # nanochat's assistant turns may be lists of parts; users' are strings
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return _normalize(content)


def needs_web_search_contextual(messages):
    """(search?, query) for the last user turn of a conversation ([{"role", "content"}, ...]).

    A query that points back ("how old is he?") and names no subject of its own gets its pronouns replaced by
    the subject of the most recent earlier user turn that names one, and needs a search when either the resolved
    query or that earlier turn does. If the conversation was about the assistant instead, the answer is no.
    """
    user_turns = [_text_of(m) for m in messages if m.get("role") == "user"]
    if not user_turns:
        return False, ""
    query, earlier = user_turns[-1], user_turns[:-1]
    if not _refers_back(query) or subject_of(query) is not None:
        return needs_web_search(query), query
    for turn in reversed(earlier):
        if ABOUT_THE_ASSISTANT.search(turn):
            return False, query  # "it"/"he" is the assistant: nothing to look up
        subject = subject_of(turn)
        if subject is not None:
            resolved = resolve_pronouns(query, subject)
            return needs_web_search(resolved) or needs_web_search(turn), resolved
    return needs_web_search(query), query
