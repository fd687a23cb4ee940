"""The quickstart task: turn a customer's free-text order message into a fixed JSON record.

The data is generated here (python -m loratune.quickstart.task writes data/*.jsonl), from word lists and
sentence patterns written for this project. A base model asked for JSON answers in its own way (other keys,
other types, extra prose); the fine-tuned one learns the exact record, which exact match measures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the order from the message as JSON with the keys customer, item, quantity, city and deliver_by."

FIRST = [
    "Priya",
    "Tomasz",
    "Aiko",
    "Mateo",
    "Fatima",
    "Lars",
    "Chloe",
    "Kwame",
    "Ingrid",
    "Rafael",
    "Mei",
    "Omar",
    "Sofia",
    "Dmitri",
    "Amara",
    "Jonas",
    "Lucia",
    "Hiro",
    "Nadia",
    "Ezra",
    "Greta",
    "Tariq",
    "Elena",
    "Bruno",
    "Yara",
    "Felix",
    "Leila",
    "Arjun",
    "Maren",
    "Diego",
    "Anika",
    "Paulo",
    "Zoe",
    "Ravi",
    "Hana",
    "Milo",
    "Ines",
    "Kofi",
    "Vera",
    "Emil",
]
LAST = [
    "Patel",
    "Nowak",
    "Tanaka",
    "Garcia",
    "Haddad",
    "Berg",
    "Martin",
    "Mensah",
    "Olsen",
    "Silva",
    "Chen",
    "Farouk",
    "Rossi",
    "Ivanov",
    "Okafor",
    "Weber",
    "Moreno",
    "Sato",
    "Karimi",
    "Cohen",
    "Lindqvist",
    "Aziz",
    "Popescu",
    "Costa",
    "Nasser",
    "Braun",
    "Rahimi",
    "Iyer",
    "Dahl",
    "Ortiz",
]
ITEMS = [
    "ceramic mugs",
    "notebooks",
    "desk lamps",
    "wool scarves",
    "water bottles",
    "phone chargers",
    "yoga mats",
    "coffee grinders",
    "bike helmets",
    "tea towels",
    "plant pots",
    "umbrellas",
    "pillow covers",
    "cutting boards",
    "backpacks",
    "candles",
    "picture frames",
    "headphones",
    "table lamps",
    "rain jackets",
    "wall clocks",
    "garden gloves",
    "bath towels",
    "lunch boxes",
]
COLOURS = ["blue", "green", "black", "white", "red", "grey", "yellow", "navy", "orange", "purple"]
CITIES = [
    "Leeds",
    "Porto",
    "Lyon",
    "Gdansk",
    "Osaka",
    "Bergen",
    "Accra",
    "Valencia",
    "Graz",
    "Quito",
    "Tampere",
    "Bristol",
    "Cork",
    "Malmo",
    "Turin",
    "Nantes",
    "Brno",
    "Ghent",
    "Utrecht",
    "Kyoto",
    "Dundee",
    "Bologna",
    "Seville",
    "Aarhus",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 10: "ten", 12: "twelve"}

PATTERNS = [
    "Hi, this is {customer}. Could you send {qty} {item} to {city} by {day}? Thanks!",
    "Hello! {customer} here. I'd like {qty} {item}, delivered to {city} before {day}.",
    "Please ship {qty} {item} to {city}. Need them by {day}. - {customer}",
    "{customer} from {city} wants {qty} {item}; latest delivery {day}.",
    "Order for {customer}: {qty} x {item}, ship to {city}, deadline {day}.",
    "Good morning, my name is {customer} and I need {qty} {item} sent to our office in {city} by {day}.",
    "Can I get {qty} {item}? Deliver to {city} no later than {day}. Regards, {customer}",
    "Hey, {customer} again - we're out of {item}. Send {qty} more to {city}, ideally by {day}.",
    "Requesting {qty} {item} for the {city} shop. Must arrive by {day}. Signed, {customer}.",
    "{day} is our deadline: {qty} {item} to {city}, please. Contact: {customer}.",
    "Dear team, kindly dispatch {qty} {item} to {city} in time for {day}. Best, {customer}",
    "Could {qty} {item} reach {city} by {day}? Ask for {customer} at reception.",
]


def make_example(rng: random.Random) -> dict:
    customer = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    item = f"{rng.choice(COLOURS)} {rng.choice(ITEMS)}" if rng.random() < 0.6 else rng.choice(ITEMS)
    quantity = rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 40, 50])
    qty_text = NUMBER_WORDS[quantity] if quantity in NUMBER_WORDS and rng.random() < 0.3 else str(quantity)
    city, day = rng.choice(CITIES), rng.choice(DAYS)
    message = rng.choice(PATTERNS).format(customer=customer, qty=qty_text, item=item, city=city, day=day)
    record = {"customer": customer, "item": item, "quantity": quantity, "city": city, "deliver_by": day}
    return {"input": f"{INSTRUCTION}\n\nMessage: {message}", "output": json.dumps(record)}


def make_splits(seed: int = 7, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Disjoint train / val / test splits (no message appears twice)."""
    sizes = sizes or {"train": 240, "val": 32, "test": 48}
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < sum(sizes.values()):
        ex = make_example(rng)
        if ex["input"] not in seen:
            seen.add(ex["input"])
            rows.append(ex)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = rows[start : start + n]
        start += n
    return out


def main() -> None:
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    for name, rows in make_splits().items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{folder / name}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
