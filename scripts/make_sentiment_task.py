"""Write a small offline sentiment task whose test words never appear in training.

Train and test sentences share templates but use disjoint sets of opinion words, so a model can
only classify the test set by knowing what unseen words mean: pretrained MiniLM can, a randomly
initialised encoder cannot. Usage: python scripts/make_sentiment_task.py OUT_DIR
"""
import csv
import random
import sys
from pathlib import Path

TEMPLATES = [
    "the film was {}", "i thought the service was {}", "honestly the food tasted {}",
    "this phone is {}", "the hotel room felt {}", "our trip turned out {}", "the concert was {}",
    "my new shoes are {}", "the book's ending was {}", "that game was {}",
]
TRAIN_WORDS = {
    "positive": ["great", "wonderful", "excellent", "lovely", "fantastic"],
    "negative": ["terrible", "awful", "horrible", "dreadful", "bad"],
}
TEST_WORDS = {
    "positive": ["superb", "delightful", "amazing", "brilliant", "marvelous", "pleasant"],
    "negative": ["disappointing", "miserable", "atrocious", "lousy", "appalling", "unpleasant"],
}


def sentences(words: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(t.format(w), label) for label, ws in words.items() for w in ws for t in TEMPLATES]


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = sentences(TRAIN_WORDS)
    random.Random(0).shuffle(train)
    write(out / "train.csv", train)
    write(out / "test.csv", sentences(TEST_WORDS))
    print(f"wrote {out / 'train.csv'} ({len(train)} rows) and {out / 'test.csv'}")


if __name__ == "__main__":
    main(sys.argv[1])
