"""
Procedural arithmetic with calculator tool calls: a GSM8K-shaped task that needs no download.

    user:      "Tom has 12 apples and buys 25 more. How many apples does he have now?"
    assistant: "He has 12 + 25 = " <python>12+25</python> <output>37</output> " apples.\n\n#### 37"

Example i is built from random.Random(i) (test split: 10_000_000 + i), like SpellingBee, so any index can be
produced on any rank without storing anything. Divisions are exact, and the python_output part holds the
result the way the engine's calculator writes it back (integral results without '.0', as GSM8K's data
writes <<48/2=24>>); the final answer follows '#### '. Used by the offline SFT mixture and by `scripts.chat_eval -a Arithmetic`.

Preview: python -m tasks.arithmetic
"""


from tasks.common import GeneratedTask, same_number

TEST_RANDOM_SEED_OFFSET = GeneratedTask.TEST_SEED_OFFSET


def extract_answer(completion):
    """The number after the last '#### ', commas removed, or None."""
    if "####" not in completion:
        return None
    tail = completion.rsplit("####", 1)[1].strip().split()
    if not tail:
        return None
    return tail[0].replace(",", "").rstrip(".")


# (question template, answer text before the tool call, answer text after it); {a}, {b} are the operands
OPERATIONS = {
    "+": {
        "bare": ["What is {a} + {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?", "What's {a} plus {b}?",
                 "Add {a} and {b}.", "what is the sum of {a} and {b}"],
        "story": [("Tom has {a} apples and buys {b} more. How many apples does he have now?", "He has {a} + {b} = ", " apples."),
                  ("A train carries {a} passengers and {b} more get on. How many passengers are on the train?", "There are {a} + {b} = ", " passengers."),
                  ("Mia read {a} pages on Monday and {b} pages on Tuesday. How many pages did she read?", "She read {a} + {b} = ", " pages.")],
    },
    "-": {
        "bare": ["What is {a} - {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?", "What's {a} minus {b}?",
                 "Subtract {b} from {a}.", "what is {a} take away {b}"],
        "story": [("Sara had {a} dollars and spent {b}. How many dollars does she have left?", "She has {a} - {b} = ", " dollars left."),
                  ("A library had {a} books and lent out {b}. How many books are still there?", "There are {a} - {b} = ", " books left."),
                  ("A farmer picked {a} eggs and {b} broke. How many eggs are not broken?", "There are {a} - {b} = ", " unbroken eggs.")],
    },
    "*": {
        "bare": ["What is {a} * {b}?", "Calculate {a} * {b}.", "{a} * {b} = ?", "What's {a} times {b}?",
                 "Multiply {a} by {b}.", "what is {a} multiplied by {b}"],
        "story": [("A box holds {a} pencils. How many pencils are in {b} boxes?", "There are {a} * {b} = ", " pencils."),
                  ("A ticket costs {a} dollars. How much do {b} tickets cost?", "They cost {a} * {b} = ", " dollars."),
                  ("Each row has {a} chairs and there are {b} rows. How many chairs are there?", "There are {a} * {b} = ", " chairs.")],
    },
    "/": {
        "bare": ["What is {a} / {b}?", "Calculate {a} / {b}.", "{a} / {b} = ?", "What's {a} divided by {b}?",
                 "Divide {a} by {b}.", "what is {a} over {b}"],
        "story": [("{a} cookies are shared equally among {b} friends. How many cookies does each friend get?", "Each friend gets {a} / {b} = ", " cookies."),
                  ("A rope of {a} meters is cut into {b} equal pieces. How long is each piece?", "Each piece is {a} / {b} = ", " meters long."),
                  ("{a} students are split into {b} equal teams. How many students are in each team?", "Each team has {a} / {b} = ", " students.")],
    },
}


def make_problem(rng):
    """(question, a, op, b, exact result) with small non-negative integers and exact division."""
    op = rng.choice("+-*/")
    digits = rng.choice([1, 2, 2, 3, 3, 4])
    if op == "+":
        a, b = rng.randint(0, 10**digits), rng.randint(0, 10**rng.randint(1, digits))
        result = a + b
    elif op == "-":
        a, b = rng.randint(0, 10**digits), rng.randint(0, 10**digits)
        a, b = max(a, b), min(a, b)
        result = a - b
    elif op == "*":
        a, b = rng.randint(2, 10**min(digits, 3)), rng.randint(2, 99 if digits > 2 else 12)
        result = a * b
    else:
        b = rng.randint(2, 25)
        result = rng.randint(1, 10**min(digits, 3))
        a = b * result
    return op, a, b, result


class Arithmetic(GeneratedTask):
    """size procedurally generated problems of one split; graded by the number after '#### '."""

    def get_example(self, index):
        rng = self.example_rng(index)
        op, a, b, result = make_problem(rng)
        templates = OPERATIONS[op]
        expr = f"{a}{op}{b}"
        tool_output = str(result)  # exact integer, as the calculator formats it (84/4 -> "21", not "21.0")
        if rng.random() < 0.5:
            question = rng.choice(templates["bare"]).format(a=a, b=b)
            before, after = f"{a} {op} {b} = ", "."
        else:
            question, before, after = rng.choice(templates["story"])
            question, before = question.format(a=a, b=b), before.format(a=a, b=b)
        if rng.random() < 0.2:
            question = question.lower()
        parts = [
            {"type": "text", "text": before},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": tool_output},
            {"type": "text", "text": f"{after}\n\n#### {result}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, assistant_response):
        """1 if the completion's '#### N' equals the reference number (compared as numbers: 21 == 21.0)."""
        assert isinstance(assistant_response, str), "Arithmetic grades plain-string completions"
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(same_number(extract_answer(assistant_response), reference))


if __name__ == "__main__":
    task = Arithmetic(size=5)
    for ex in task:
        user, assistant = ex["messages"]
        print(user["content"])
        print("".join(p["text"] if p["type"] == "text" else f"<<{p['text']}=" if p["type"] == "python"
                      else f"{p['text']}>>" for p in assistant["content"]))
        print("-" * 60)
