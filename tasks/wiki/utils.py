# Data for the offline tasks in this folder, built at load time from the eval half of the Wikipedia summaries
# (quantize.wiki_texts; GPTQ calibrates on the other half).
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for quantize
from quantize import wiki_texts  # noqa: E402

CLOZE_ITEMS = 1000  # enough for a stable accuracy, small enough for a CPU run with --limit
N_CHOICES = 4
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]][.!?])\s+(?=[A-Z\"(])")


def cloze_docs() -> list[dict]:
    """Each item: the first half of an article's first sentence, and four endings: its own and those of three
    other articles' first sentences. Picking the true one needs knowing what the subject is."""
    halves = []
    for text in wiki_texts("eval"):
        words = SENTENCE_END.split(text, maxsplit=1)[0].split()
        if 12 <= len(words) <= 60:
            cut = len(words) // 2
            halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    rng = random.Random(1234)
    docs = []
    for i, (context, ending) in enumerate(halves[:CLOZE_ITEMS]):
        others = set()
        while len(others) < N_CHOICES - 1:
            j = rng.randrange(len(halves))
            if j != i and halves[j][1] != ending:
                others.add(halves[j][1])
        choices = sorted(others)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, ending)
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def text_docs() -> list[dict]:
    return [{"text": t} for t in wiki_texts("eval")]


def _test_split(docs):
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def cloze_dataset(**kwargs):
    return _test_split(cloze_docs())


def text_dataset(**kwargs):
    return _test_split(text_docs())
