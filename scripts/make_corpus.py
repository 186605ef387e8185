"""Write src/memfit/data/corpus.txt: the small character-level corpus the GPT
recipe trains on by default. Generated from a fixed grammar with a fixed
seed, so it is reproducible and downloads nothing.

    python scripts/make_corpus.py
"""
import random
from pathlib import Path

NAMES = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars"]
PLACES = ["the harbour", "the old mill", "the library", "the market", "the lighthouse", "the river bank",
          "the station", "the orchard", "the workshop", "the bridge"]
THINGS = ["a lantern", "the map", "a letter", "the key", "a basket of apples", "the clock", "a small boat",
          "the ledger", "a wooden box", "the telescope", "a loaf of bread", "the violin"]
VERBS = ["found", "carried", "lost", "mended", "sold", "painted", "hid", "opened", "bought", "forgot"]
MOODS = ["quietly", "slowly", "at dawn", "before the rain", "after supper", "without a word", "with great care",
         "in a hurry", "once more", "by candlelight"]
WEATHER = ["The wind was cold", "The sky was grey", "The sun was warm", "Snow fell softly", "The rain had stopped",
           "Fog lay over the water"]
THOUGHTS = ["remembered the summer", "wondered about the stranger", "counted the coins twice",
            "wrote a note to a friend", "listened to the bells", "thought of home"]


def sentence(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    kind = r.randrange(6)
    if kind == 0:
        return f"{a} {r.choice(VERBS)} {r.choice(THINGS)} at {r.choice(PLACES)} {r.choice(MOODS)}."
    if kind == 1:
        return f"{r.choice(WEATHER)}, and {a} walked to {r.choice(PLACES)}."
    if kind == 2:
        return f"\"Where is {r.choice(THINGS)}?\" asked {a}. \"At {r.choice(PLACES)},\" said {b}."
    if kind == 3:
        return f"{a} and {b} met at {r.choice(PLACES)}, and {a} {r.choice(THOUGHTS)}."
    if kind == 4:
        return f"When {a} {r.choice(VERBS)} {r.choice(THINGS)}, {b} {r.choice(THOUGHTS)}."
    return f"{a} {r.choice(THOUGHTS)} {r.choice(MOODS)}."


def main(chars=200_000, seed=1234):
    r = random.Random(seed)
    paragraphs, size = [], 0
    while size < chars:
        p = " ".join(sentence(r) for _ in range(r.randint(3, 7)))
        paragraphs.append(p)
        size += len(p) + 2
    path = Path(__file__).resolve().parents[1] / "src" / "memfit" / "data" / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
